"""Each tiny pipeline loads and runs offline like the real model of its family; each tiny decoder
decodes that family's latents to images of the pipeline's size."""

from pathlib import Path

import pytest
import torch
from diffusers import (
    AutoencoderTiny,
    DDIMScheduler,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
)
from transformers import T5TokenizerFast

from tiny_pipelines import (
    FAMILIES,
    GUIDANCE_SCALE,
    LATENT_CHANNELS,
    PIPELINES,
    RESOLUTION,
    VAE_FACTOR,
    build_tiny_pipeline,
)

PROMPTS = ["a photo of a rose, a type of flower.", "Ein Hund im Schnee, ☃"]  # the last character is no T5 piece


@pytest.fixture(scope="module")
def load(tiny_models):
    """`load(family)`: the family's tiny pipeline through its diffusers class, offline, loaded once per module."""
    return tiny_models.loader(lambda family, path: PIPELINES[family].from_pretrained(path))


def _generate(pipe, family):
    size = RESOLUTION[family]
    return pipe(
        prompt=PROMPTS,
        num_inference_steps=2,
        guidance_scale=GUIDANCE_SCALE[family],
        generator=[torch.Generator().manual_seed(0), torch.Generator().manual_seed(1)],
        output_type="pt",
        height=size,
        width=size,
    ).images  # [2, 3, size, size] in [0, 1]


@pytest.mark.parametrize("family", FAMILIES)
def test_generates_finite_deterministic_images(load, family):
    pipe = load(family)
    assert type(pipe) is PIPELINES[family]
    first = _generate(pipe, family)
    size = RESOLUTION[family]
    assert first.shape == (2, 3, size, size)
    assert torch.isfinite(first).all()
    assert 0 <= first.min() and first.max() <= 1 and first.std() > 0
    assert not torch.equal(first[0], first[1])
    assert torch.equal(first, _generate(pipe, family))


@pytest.mark.parametrize("family", FAMILIES)
def test_vae_has_the_family_latent_space(load, family):
    vae = load(family).vae.config
    assert vae.latent_channels == LATENT_CHANNELS[family]
    assert 2 ** (len(vae.block_out_channels) - 1) == VAE_FACTOR
    expected = {"sd14": (0.18215, None), "sd2-v": (0.18215, None), "sdxl": (0.13025, None),
                "sd3": (1.5305, 0.0609), "flux": (0.3611, 0.1159), "flux-schnell": (0.3611, 0.1159)}
    assert (vae.scaling_factor, vae.shift_factor) == expected[family]
    assert vae.use_quant_conv == vae.use_post_quant_conv == (vae.shift_factor is None)


def test_sd2_is_v_prediction_ddim(load):
    cfg = load("sd2-v").scheduler.config
    assert isinstance(load("sd2-v").scheduler, DDIMScheduler)
    assert (cfg.prediction_type, cfg.timestep_spacing, cfg.steps_offset) == ("v_prediction", "leading", 1)
    assert (cfg.beta_start, cfg.beta_end, cfg.beta_schedule) == (0.00085, 0.012, "scaled_linear")
    assert (cfg.clip_sample, cfg.set_alpha_to_one) == (False, False)


def test_sdxl_conditioning_matches_its_text_towers(load):
    pipe = load("sdxl")
    unet, proj_dim = pipe.unet.config, pipe.text_encoder_2.config.projection_dim
    assert unet.cross_attention_dim == pipe.text_encoder.config.hidden_size + pipe.text_encoder_2.config.hidden_size
    assert unet.addition_embed_type == "text_time"
    assert unet.projection_class_embeddings_input_dim == 6 * unet.addition_time_embed_dim + proj_dim
    assert pipe.config.force_zeros_for_empty_prompt and pipe.vae.config.force_upcast
    assert pipe.tokenizer_2.pad_token == "!"
    assert isinstance(pipe.scheduler, EulerDiscreteScheduler)
    cfg = pipe.scheduler.config
    assert (cfg.prediction_type, cfg.timestep_spacing, cfg.steps_offset) == ("epsilon", "leading", 1)
    assert (cfg.interpolation_type, cfg.use_karras_sigmas) == ("linear", False)


def test_sd3_joint_text_fits_the_transformer(load):
    pipe = load("sd3")
    clip_widths = [pipe.text_encoder.config.hidden_size, pipe.text_encoder_2.config.hidden_size]
    assert sum(clip_widths) <= pipe.text_encoder_3.config.d_model == pipe.transformer.config.joint_attention_dim
    projections = pipe.text_encoder.config.projection_dim + pipe.text_encoder_2.config.projection_dim
    assert pipe.transformer.config.pooled_projection_dim == projections
    assert pipe.default_sample_size * pipe.vae_scale_factor == RESOLUTION["sd3"]
    assert pipe.scheduler.config.shift == 3.0 and not pipe.scheduler.config.use_dynamic_shifting


@pytest.mark.parametrize("family, guidance_embeds, dynamic_shifting, shift",
                         [("flux", True, True, 3.0), ("flux-schnell", False, False, 1.0)])
def test_flux_transformer_and_scheduler(load, family, guidance_embeds, dynamic_shifting, shift):
    pipe = load(family)
    transformer = pipe.transformer.config
    assert transformer.in_channels == 4 * LATENT_CHANNELS[family]
    assert sum(transformer.axes_dims_rope) == transformer.attention_head_dim
    assert transformer.guidance_embeds == guidance_embeds
    assert transformer.joint_attention_dim == pipe.text_encoder_2.config.d_model
    assert isinstance(pipe.scheduler, FlowMatchEulerDiscreteScheduler)
    cfg = pipe.scheduler.config
    assert (cfg.use_dynamic_shifting, cfg.shift) == (dynamic_shifting, shift)
    assert (cfg.base_shift, cfg.max_shift, cfg.base_image_seq_len, cfg.max_image_seq_len) == (0.5, 1.15, 256, 4096)


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_t5_tokenizer_pads_to_512(load, family):
    tok = load(family).tokenizer_3 if family == "sd3" else load(family).tokenizer_2
    assert isinstance(tok, T5TokenizerFast)
    assert (tok.pad_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2)
    ids = tok(PROMPTS, padding="max_length", max_length=tok.model_max_length).input_ids
    assert tok.model_max_length == 512 and all(len(row) == 512 for row in ids)
    assert tok.unk_token_id not in ids[0] and tok.unk_token_id in ids[1]
    assert all(tok.eos_token_id in row for row in ids)


@pytest.mark.parametrize("family", FAMILIES)
def test_decoder_decodes_the_pipeline_latents(tiny_models, load, family):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        decoder = AutoencoderTiny.from_pretrained(tiny_models.decoder(family))
    vae = load(family).vae
    assert decoder.config.latent_channels == vae.config.latent_channels
    side = RESOLUTION[family] // VAE_FACTOR
    latents = torch.randn(1, vae.config.latent_channels, side, side)
    with torch.no_grad():
        image = decoder.decode(latents).sample
        assert image.shape == vae.decode(latents).sample.shape == (1, 3, RESOLUTION[family], RESOLUTION[family])
    assert torch.isfinite(image).all()


@pytest.mark.parametrize("family", FAMILIES)
def test_build_depends_only_on_seed(tmp_path, family):
    state = torch.random.get_rng_state()
    a, b, c = (Path(build_tiny_pipeline(family, tmp_path / name, seed)) for name, seed in zip("abc", [0, 0, 1]))
    assert torch.equal(torch.random.get_rng_state(), state)
    weights = sorted(p.relative_to(a) for p in a.rglob("*.safetensors"))
    assert weights
    assert all((a / w).read_bytes() == (b / w).read_bytes() for w in weights)
    assert any((a / w).read_bytes() != (c / w).read_bytes() for w in weights)
