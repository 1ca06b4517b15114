"""The tiny SD pipeline loads and runs offline exactly like SD 1.4 would."""

from pathlib import Path

import pytest
import torch
from diffusers import DDIMScheduler, StableDiffusionPipeline

from tiny_sd import build_tiny_sd  # pytest's default "prepend" import mode puts tests/ on sys.path

PROMPT = "a photo of a rose, a type of flower."


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    path = build_tiny_sd(tmp_path_factory.mktemp("tiny_sd"))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        pipe = StableDiffusionPipeline.from_pretrained(path)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_loads_offline_with_sd14_shapes(pipe):
    assert pipe.safety_checker is None
    assert pipe.vae_scale_factor == 8
    assert pipe.vae.config.scaling_factor == 0.18215
    assert pipe.unet.config.cross_attention_dim == pipe.text_encoder.config.hidden_size
    assert pipe.text_encoder.config.vocab_size == len(pipe.tokenizer)
    cfg = pipe.scheduler.config
    assert isinstance(pipe.scheduler, DDIMScheduler)
    assert (cfg.beta_start, cfg.beta_end, cfg.beta_schedule) == (0.00085, 0.012, "scaled_linear")
    assert (cfg.clip_sample, cfg.set_alpha_to_one, cfg.steps_offset) == (False, False, 1)


def test_build_is_deterministic(tmp_path):
    a = Path(build_tiny_sd(tmp_path / "a", seed=0))
    b = Path(build_tiny_sd(tmp_path / "b", seed=0))
    weights = sorted(p.relative_to(a) for p in a.rglob("*.safetensors"))
    assert len(weights) == 3  # unet, vae, text_encoder
    for w in weights:
        assert (a / w).read_bytes() == (b / w).read_bytes(), w


def _generate(pipe, seed):
    return pipe(
        PROMPT,
        num_inference_steps=2,
        guidance_scale=7.5,
        generator=torch.Generator().manual_seed(seed),
        output_type="pt",
    ).images  # [1, 3, 64, 64] in [0, 1]


def test_generates_finite_deterministic_images(pipe):
    first = _generate(pipe, seed=0)
    assert first.shape == (1, 3, 64, 64)
    assert torch.isfinite(first).all()
    assert first.std() > 0
    assert torch.equal(first, _generate(pipe, seed=0))
    assert not torch.equal(first, _generate(pipe, seed=1))


def test_tokenizer_pads_to_77_without_unknown_tokens(pipe):
    tok = pipe.tokenizer
    assert tok.unk_token not in tok.tokenize(PROMPT)
    ids = tok(PROMPT, padding="max_length", max_length=tok.model_max_length).input_ids
    assert len(ids) == tok.model_max_length == 77
    assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id
