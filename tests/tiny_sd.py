"""Build a randomly initialised Stable-Diffusion-1.x-shaped pipeline on disk: tiny (for the suite)
or with the full SD 1.4 architecture (for the opt-in shape test and benchmarks).

Tests load it exactly as a user loads SD 1.4:
``StableDiffusionPipeline.from_pretrained(path)`` (with ``HF_HUB_OFFLINE=1``).
Nothing is downloaded; every component is built from a config.

Shapes: prompt -> 77 token ids -> text embeddings [B, 77, 32];
latents [B, 4, 8, 8] -> VAE decode -> images [B, 3, 64, 64].
"""

import json
import os
import shutil
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

MAX_LEN = 77  # CLIP context length, as in SD 1.x
BOS, EOS = "<|startoftext|>", "<|endoftext|>"
# A few merges so common words become multi-byte tokens, as in a real BPE.
MERGES = [("t", "h"), ("th", "e</w>"), ("o", "f</w>"), ("a", "n"), ("an", "d</w>"), ("r", "o")]

# SD 1.4's scheduler settings (its scheduler_config.json), as a DDIMScheduler.
SD14_SCHEDULER = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                      clip_sample=False, set_alpha_to_one=False, steps_offset=1, prediction_type="epsilon")


def _bytes_to_unicode():
    """CLIP/GPT-2 byte -> printable unicode character map (256 entries)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    bs += list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


def _write_tokenizer_files(folder):
    """Write a byte-level BPE vocab.json + merges.txt; return the vocab size.

    Vocab layout mirrors CLIP's: 256 bytes, their 256 `</w>` (end-of-word)
    variants, one entry per merge, then the two special tokens. Every byte is
    covered, so any prompt tokenizes without unknown tokens.
    """
    chars = list(_bytes_to_unicode().values())
    tokens = chars + [c + "</w>" for c in chars] + [a + b for a, b in MERGES] + [BOS, EOS]
    vocab = {tok: i for i, tok in enumerate(tokens)}
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump(vocab, f, ensure_ascii=False)
    with open(os.path.join(folder, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in MERGES))
    return len(vocab)


# Component sizes. text: (hidden, ffn, layers, heads); hidden == the UNet's cross_attention_dim.
TINY = dict(text=(32, 64, 2, 4), unet=dict(sample_size=8, block_out_channels=(32, 64), layers_per_block=1,
                                           down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                           up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
                                           attention_head_dim=8),
            vae=dict(block_out_channels=(8, 16, 16, 16), layers_per_block=1, norm_num_groups=8, sample_size=64))
# The published SD 1.4 configs (CLIP ViT-L/14 text tower, 860M-parameter UNet, 512 px VAE).
SD14 = dict(text=(768, 3072, 12, 12), unet=dict(sample_size=64, block_out_channels=(320, 640, 1280, 1280),
                                                layers_per_block=2, attention_head_dim=8),
            vae=dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, norm_num_groups=32,
                     sample_size=512))


def build_tiny_sd(path, seed=0):
    """Save a tiny random SD-1.x-shaped pipeline to `path` and return `path`."""
    return build_sd(path, TINY, seed)


def build_sd(path, sizes, seed=0):
    """Save a random pipeline with component `sizes` (TINY or SD14) to `path` and return `path`.

    Weights depend only on `seed`; the caller's global torch RNG is left untouched.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return _build(str(path), sizes)


def _build(path, sizes):
    """Build every component from its config and `save_pretrained` the pipeline to `path`."""
    tok_dir = os.path.join(path, "tokenizer")
    vocab_size = _write_tokenizer_files(tok_dir)
    tokenizer = CLIPTokenizer.from_pretrained(tok_dir, model_max_length=MAX_LEN)

    hidden, ffn, layers, heads = sizes["text"]
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=vocab_size,
            hidden_size=hidden,
            intermediate_size=ffn,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            max_position_embeddings=MAX_LEN,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )

    # Latents [B, 4, s, s] (tiny: s = 8; SD 1.4: s = 64), cross-attending to [B, 77, hidden].
    unet = UNet2DConditionModel(in_channels=4, out_channels=4, cross_attention_dim=hidden, norm_num_groups=32,
                                **sizes["unet"])

    # Images [B, 3, 8s, 8s] <-> latents [B, 4, s, s]: 4 blocks = 3 downsamples = 8x.
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        latent_channels=4,
        scaling_factor=0.18215,
        **sizes["vae"],
    )

    scheduler = DDIMScheduler(**SD14_SCHEDULER)

    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(path)
    return path


def install_in_hub_cache(path, cache, repo_id, commit="0" * 40):
    """Lay a saved pipeline out in a Hugging Face hub cache as the snapshot of `repo_id`, so that
    `from_pretrained(repo_id)` finds it offline exactly as it finds a downloaded model."""
    repo = Path(cache) / f"models--{repo_id.replace('/', '--')}"
    shutil.copytree(path, repo / "snapshots" / commit)
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(commit)
    return Path(cache)
