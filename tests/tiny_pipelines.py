"""Build randomly initialised, tiny text-to-image pipelines of each modern family on disk
(SD 2.x v-prediction, SDXL, SD 3.5, FLUX.1 dev and schnell), and tiny random TAESD-style decoders.

Tests load them exactly as users load the real models: ``PIPELINES[family].from_pretrained(path)``
(with ``HF_HUB_OFFLINE=1``). Nothing is downloaded; every component is built from a config, with the
real model's scheduler, VAE scaling and conditioning layout, so only the sizes are tiny.

Every family generates images [B, 3, 64, 64] from latents [B, C, 8, 8] (VAE factor 8, C in
LATENT_CHANNELS). Text: CLIP prompts -> 77 tokens; T5 prompts -> `max_sequence_length` tokens
(the pipelines' defaults, 256 for SD3 and 512 for FLUX, work; tests may pass fewer for speed).
  sd14, sd2-v  UNet on [B, 4, 8, 8], cross-attending to CLIP [B, 77, 32].
  sdxl         UNet on [B, 4, 8, 8], cross-attending to [B, 77, 32 + 64] (both CLIP towers' penultimate
               layers), plus pooled [B, 64] and 6 size/crop ids in the "text_time" embedding.
  sd3          transformer on [B, 16, 8, 8] in 2x2 patches (16 tokens), joint attention with
               [B, 77 + T5 length, 128] (CLIP [B, 77, 32 + 64] zero-padded to T5's width 128, then T5);
               pooled [B, 32 + 64].
  flux         transformer on the 2x2-packed latents [B, 16, 64], joint attention with T5 [B, T5 length, 128];
               pooled CLIP [B, 32]; "flux" also embeds the guidance scale, "flux-schnell" does not.
"""

import os
import string
from pathlib import Path
from unittest import mock

import torch
from diffusers import (
    AutoencoderKL,
    AutoencoderTiny,
    DDIMScheduler,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    T5Config,
    T5EncoderModel,
    T5TokenizerFast,
)

import tiny_sd

PIPELINES = {
    "sd14": StableDiffusionPipeline,
    "sd2-v": StableDiffusionPipeline,
    "sdxl": StableDiffusionXLPipeline,
    "sd3": StableDiffusion3Pipeline,
    "flux": FluxPipeline,
    "flux-schnell": FluxPipeline,
}
FAMILIES = tuple(PIPELINES)
RESOLUTION = dict.fromkeys(FAMILIES, 64)  # the height and width to call each tiny pipeline with
VAE_FACTOR = 8
LATENT_CHANNELS = {"sd14": 4, "sd2-v": 4, "sdxl": 4, "sd3": 16, "flux": 16, "flux-schnell": 16}
# The pipelines' default guidance scales; schnell is guidance-distilled and run without guidance.
GUIDANCE_SCALE = {"sd14": 7.5, "sd2-v": 7.5, "sdxl": 5.0, "sd3": 7.0, "flux": 3.5, "flux-schnell": 0.0}

# The hub's scheduler_config.json of each real model, restricted to the arguments its class takes.
SCALED_LINEAR = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
SD21_SCHEDULER = dict(SCALED_LINEAR, prediction_type="v_prediction", timestep_spacing="leading", steps_offset=1,
                      clip_sample=False, set_alpha_to_one=False)
SDXL_SCHEDULER = dict(SCALED_LINEAR, prediction_type="epsilon", timestep_spacing="leading", steps_offset=1,
                      interpolation_type="linear", use_karras_sigmas=False)
SD35_SCHEDULER = dict(num_train_timesteps=1000, shift=3.0)
FLUX_SHIFTS = dict(num_train_timesteps=1000, base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
                   max_image_seq_len=4096)
FLUX_DEV_SCHEDULER = dict(FLUX_SHIFTS, use_dynamic_shifting=True, shift=3.0)
FLUX_SCHNELL_SCHEDULER = dict(FLUX_SHIFTS, use_dynamic_shifting=False, shift=1.0)

# Latent statistics of each family's VAE: (scaling_factor, shift_factor).
LATENT_SCALING = {"sd14": (0.18215, None), "sd2-v": (0.18215, None), "sdxl": (0.13025, None),
                  "sd3": (1.5305, 0.0609), "flux": (0.3611, 0.1159), "flux-schnell": (0.3611, 0.1159)}

# Text towers, (hidden, ffn, layers, heads): CLIP ViT-L/14 and OpenCLIP bigG (whose width is the
# projection width too), and T5 v1.1 (as in SD3 and FLUX), scaled down keeping L < bigG < T5.
CLIP_L, CLIP_G, T5 = (32, 64, 2, 4), (64, 128, 2, 4), (128, 256, 2, 4)
T5_MAX_LEN = 512  # the T5 tokenizer's model_max_length, as FLUX's; FLUX pads to up to 512 tokens
T5_WORDS = ("a", "an", "the", "of", "and", "photo", "in", "on", "with")

SD2_SIZES = dict(tiny_sd.TINY, unet=dict(tiny_sd.TINY["unet"], use_linear_projection=True))
VAE_SIZES = dict(block_out_channels=(8, 16, 16, 16), layers_per_block=1, norm_num_groups=8, sample_size=64)


def build_tiny_pipeline(family, path, seed=0):
    """Save a tiny random pipeline of `family` (a key of PIPELINES) to `path` and return `path`.

    Weights depend only on `seed`; the caller's global torch RNG is left untouched.
    """
    path = str(path)
    if family == "sd14":
        return tiny_sd.build_tiny_sd(path, seed)
    if family == "sd2-v":
        tiny_sd.build_sd(path, SD2_SIZES, seed)
        DDIMScheduler(**SD21_SCHEDULER).save_pretrained(Path(path) / "scheduler")
        return path
    builders = {"sdxl": _sdxl, "sd3": _sd3, "flux": _flux, "flux-schnell": _flux_schnell}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        builders[family](path).save_pretrained(path)
    return path


def build_tiny_decoder(family, path, seed=0):
    """Save a tiny random `AutoencoderTiny` shaped like `family`'s TAESD / TAESDXL / TAESD3 / TAEF1 to `path`.

    It maps the family's latents [B, C, s, s] to images [B, 3, 8s, 8s], as the tiny pipeline's VAE does.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        # 4 blocks per side, 3 of them resampling by 2: 8x, as the real decoders. Like them, it decodes the
        # network's latents as they are: scale 1, shift 0 (the defaults).
        decoder = AutoencoderTiny(
            latent_channels=LATENT_CHANNELS[family],
            encoder_block_out_channels=(8,) * 4, num_encoder_blocks=(1,) * 4,
            decoder_block_out_channels=(8,) * 4, num_decoder_blocks=(1,) * 4)
        decoder.save_pretrained(path)
    return str(path)


class TinyModels:
    """Tiny pipelines and decoders under `root`, each built on first request: for a session-scoped fixture."""

    def __init__(self, root):
        self.root = Path(root)
        self._paths = {}

    def pipeline(self, family):
        return self._get(build_tiny_pipeline, family, "pipeline")

    def decoder(self, family):
        return self._get(build_tiny_decoder, family, "decoder")

    def loader(self, load):
        """`get(family)`: load(family, folder of its tiny pipeline) offline (HF_HUB_OFFLINE=1), once per family."""
        loaded = {}

        def get(family):
            if family not in loaded:
                with mock.patch.dict(os.environ, HF_HUB_OFFLINE="1"):
                    loaded[family] = load(family, self.pipeline(family))
                loaded[family].set_progress_bar_config(disable=True)
            return loaded[family]

        return get

    def _get(self, build, family, kind):
        key = f"{kind}-{family}"
        if key not in self._paths:
            self._paths[key] = build(family, self.root / key)
        return self._paths[key]


def _sdxl(path):
    tokenizer, tokenizer_2 = _clip_tokenizer(path, "tokenizer"), _clip_tokenizer(path, "tokenizer_2", pad_token="!")
    text_encoder = CLIPTextModel(_clip_config(CLIP_L, tokenizer))
    text_encoder_2 = CLIPTextModelWithProjection(_clip_config(CLIP_G, tokenizer_2))
    time_dim, pooled_dim = 8, CLIP_G[0]
    # Latents [B, 4, 8, 8] cross-attending to both towers' hidden states [B, 77, 32 + 64]; the "text_time"
    # embedding takes tower 2's pooled [B, 64] and 6 ids (original size, crop corner, target size), 8 dims each.
    unet = UNet2DConditionModel(
        sample_size=RESOLUTION["sdxl"] // VAE_FACTOR, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(32, 64), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), transformer_layers_per_block=(1, 2),
        attention_head_dim=(2, 4), use_linear_projection=True, cross_attention_dim=CLIP_L[0] + CLIP_G[0],
        addition_embed_type="text_time", addition_time_embed_dim=time_dim,
        projection_class_embeddings_input_dim=6 * time_dim + pooled_dim)
    return StableDiffusionXLPipeline(
        vae=_vae("sdxl"), text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=tokenizer,
        tokenizer_2=tokenizer_2, unet=unet, scheduler=EulerDiscreteScheduler(**SDXL_SCHEDULER),
        force_zeros_for_empty_prompt=True, add_watermarker=False)


def _sd3(path):
    tokenizer, tokenizer_2 = _clip_tokenizer(path, "tokenizer"), _clip_tokenizer(path, "tokenizer_2", pad_token="!")
    text_encoder = CLIPTextModelWithProjection(_clip_config(CLIP_L, tokenizer))
    text_encoder_2 = CLIPTextModelWithProjection(_clip_config(CLIP_G, tokenizer_2))
    tokenizer_3, text_encoder_3 = _t5()
    heads, head_dim = 4, 8
    # Latents [B, 16, 8, 8] (the pipeline's default size: sample_size * 8) -> 2x2 patches -> 16 tokens of width 32,
    # joint attention with the text [B, 77 + T5 length, 128]; pooled CLIP [B, 32 + 64].
    transformer = SD3Transformer2DModel(
        sample_size=RESOLUTION["sd3"] // VAE_FACTOR, patch_size=2, in_channels=16, out_channels=16, num_layers=2,
        attention_head_dim=head_dim, num_attention_heads=heads, joint_attention_dim=T5[0],
        caption_projection_dim=heads * head_dim, pooled_projection_dim=CLIP_L[0] + CLIP_G[0], pos_embed_max_size=16,
        qk_norm="rms_norm")
    return StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(**SD35_SCHEDULER), vae=_vae("sd3"),
        text_encoder=text_encoder, tokenizer=tokenizer, text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2,
        text_encoder_3=text_encoder_3, tokenizer_3=tokenizer_3)


def _flux(path, guidance_embeds=True, scheduler=FLUX_DEV_SCHEDULER):
    tokenizer = _clip_tokenizer(path, "tokenizer")
    text_encoder = CLIPTextModel(_clip_config(CLIP_L, tokenizer))
    tokenizer_2, text_encoder_2 = _t5()
    heads, head_dim = 2, 16
    # Packed latents [B, 16, 64] (16 channels in 2x2 patches; rotary positions over (text, row, column)),
    # joint attention with T5 [B, T5 length, 128]; pooled CLIP [B, 32].
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=64, num_layers=1, num_single_layers=1, attention_head_dim=head_dim,
        num_attention_heads=heads, joint_attention_dim=T5[0], pooled_projection_dim=CLIP_L[0],
        guidance_embeds=guidance_embeds, axes_dims_rope=(4, 6, 6))
    return FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**scheduler), vae=_vae("flux"), text_encoder=text_encoder,
        tokenizer=tokenizer, text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2, transformer=transformer)


def _flux_schnell(path):
    return _flux(path, guidance_embeds=False, scheduler=FLUX_SCHNELL_SCHEDULER)


def _clip_tokenizer(path, name, **special_tokens):
    """tiny_sd's byte-level CLIP BPE, written under `path`/`name` (which save_pretrained later overwrites)."""
    folder = Path(path) / name
    tiny_sd._write_tokenizer_files(folder)
    return CLIPTokenizer.from_pretrained(folder, model_max_length=tiny_sd.MAX_LEN, **special_tokens)


def _clip_config(sizes, tokenizer):
    hidden, ffn, layers, heads = sizes
    return CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=layers,
        num_attention_heads=heads, projection_dim=hidden, max_position_embeddings=tiny_sd.MAX_LEN,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)


def _t5():
    """A T5 v1.1-shaped encoder and a Unigram tokenizer built in code (no sentencepiece model).

    Vocab as T5's: <pad> = 0, </s> = 1, <unk> = 2, then word pieces ("▁" starts a word). Every printable
    ASCII and Latin-1 character is a piece, so prompts tokenize; other characters become <unk>.
    """
    chars = [c for c in string.printable if not c.isspace()] + [chr(i) for i in range(0xA1, 0x100)]
    vocab = ([("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)] + [("▁" + w, -3.0) for w in T5_WORDS]
             + [(c, -5.0) for c in chars])
    tokenizer = T5TokenizerFast(vocab=vocab, extra_ids=0, model_max_length=T5_MAX_LEN)
    d_model, d_ff, layers, heads = T5
    encoder = T5EncoderModel(T5Config(
        vocab_size=len(tokenizer), d_model=d_model, d_kv=d_model // heads, d_ff=d_ff, num_layers=layers,
        num_heads=heads, feed_forward_proj="gated-gelu", pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id, decoder_start_token_id=tokenizer.pad_token_id))
    return tokenizer, encoder


def _vae(family):
    """Images [B, 3, 8s, 8s] <-> latents [B, C, s, s]: 4 blocks = 3 downsamples = 8x, as the real VAEs."""
    scaling, shift = LATENT_SCALING[family]
    quant_convs = shift is None  # SD3's and FLUX's VAEs have no quant convs
    return AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=LATENT_CHANNELS[family], scaling_factor=scaling,
        shift_factor=shift, force_upcast=True, use_quant_conv=quant_convs, use_post_quant_conv=quant_convs,
        **VAE_SIZES)
