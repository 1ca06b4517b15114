"""Algorithm 1 on a Stable-Diffusion-shaped pipeline loaded through `from_pretrained`, as a user
loads SD 1.4: a tiny one in the suite, the full SD 1.4 architecture behind LTG_FULL_SD=1. (w = 0 against
each family's own pipeline, SD 1.x included, is in test_families.py.)"""

import os

import pytest
import torch
from diffusers import AutoencoderTiny

import ltg
from test_sampler import tiny_head
from tiny_sd import SD14, build_sd

PROMPTS = [f"a photo of a {c}, a type of flower." for c in ("rose", "tulip", "daisy", "lily")] * 2
SEEDS = list(range(8))


@pytest.fixture
def pipe(tiny_sd_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return ltg.load_pipeline(tiny_sd_path)


def sample(pipe, w=0.0, steps=8, images=8, head_dtype=torch.float32, **kwargs):
    guidance = ltg.Guidance(w=w, **{k: kwargs.pop(k) for k in list(kwargs) if k in ("rescale", "signal")})
    return ltg.sample_pipeline(pipe, tiny_head().to(head_dtype), PROMPTS[:images], SEEDS[:images], guidance, 7.5,
                               num_inference_steps=steps, progress=False, **kwargs)


def tiny_guidance_decoder():
    torch.manual_seed(0)
    return AutoencoderTiny(encoder_block_out_channels=(8, 8, 8, 8), decoder_block_out_channels=(8, 8, 8, 8),
                           num_encoder_blocks=(1, 1, 1, 1), num_decoder_blocks=(1, 1, 1, 1))


@pytest.mark.parametrize("rescale, ws", [(False, (0.0, 10.0, 50.0)), (True, (0.0, 0.1, 0.3))],
                         ids=["raw", "rescaled"])
def test_mean_signal_rises_with_weight(pipe, rescale, ws):
    means = [sample(pipe, w, rescale=rescale).signal.mean().item() for w in ws]
    assert means[0] < means[1] < means[2], f"mean signal at w={ws}: {means}"


def test_rescaled_guidance_term_is_w_times_the_noise_norm(pipe):
    out = sample(pipe, 0.3, rescale=True)
    assert len(out.guidance_ratio) == 8
    torch.testing.assert_close(torch.tensor(out.guidance_ratio), torch.full((8,), 0.3), rtol=1e-4, atol=1e-6)


def test_decoder_checkpointing_changes_memory_not_results(pipe):
    plain = sample(pipe, 20.0)
    checkpointed = sample(pipe, 20.0, checkpoint_decoder=True)
    torch.testing.assert_close(checkpointed.images, plain.images, rtol=1e-5, atol=1e-5)


def test_a_tiny_guidance_decoder_steers_while_the_full_one_renders(pipe):
    tiny = tiny_guidance_decoder()
    plain, cheap = sample(pipe, 20.0), sample(pipe, 20.0, guidance_decoder=tiny)
    unguided = sample(pipe, 0.0)
    assert torch.isfinite(cheap.images).all() and cheap.images.shape == plain.images.shape
    assert not torch.allclose(cheap.images, plain.images), "the guidance decoder was not used"
    assert not torch.allclose(cheap.images, unguided.images), "the tiny decoder's gradient did not steer"


def test_bfloat16_autocast_stays_close_to_float32(pipe):
    full = sample(pipe, 10.0)
    mixed = sample(pipe, 10.0, autocast=torch.bfloat16)
    assert mixed.images.dtype == torch.float32 and torch.isfinite(mixed.images).all()
    assert (mixed.images - full.images).abs().mean() < 0.02


@pytest.mark.parametrize("pipe_dtype, head_dtype, tiny_decoder", [
    (torch.float16, torch.float32, False), (torch.bfloat16, torch.float32, False),
    (torch.float32, torch.bfloat16, False), (torch.float16, torch.float32, True)],
    ids=["float16-pipeline", "bfloat16-pipeline", "bfloat16-head", "float16-pipeline-float32-guidance-decoder"])
def test_half_precision_models_guide_without_autocast(pipe, tiny_sd_path, pipe_dtype, head_dtype, tiny_decoder):
    """Each model runs in its own dtype (z and the DDIM math stay float32): every guided step gets a
    finite, non-zero gradient, every image's signal rises, and the images follow float32's guided ones."""
    def run(models, w, head_dtype):
        return sample(models, w, steps=2, images=4, head_dtype=head_dtype, rescale=True,
                      guidance_decoder=tiny_guidance_decoder() if tiny_decoder else None)

    half = ltg.load_pipeline(tiny_sd_path, dtype=pipe_dtype)
    guided, unguided = run(half, 0.3, head_dtype), run(half, 0.0, head_dtype)
    full = run(pipe, 0.3, torch.float32)
    assert guided.images.shape == (4, 3, 64, 64) and guided.images.dtype == torch.float32
    assert torch.isfinite(guided.images).all() and guided.skipped.tolist() == [0] * 4
    torch.testing.assert_close(torch.tensor(guided.guidance_ratio), torch.full((2,), 0.3), rtol=1e-4, atol=1e-6)
    assert (guided.signal > unguided.signal).all(), (guided.signal, unguided.signal)
    moved = (guided.images - unguided.images).abs().mean()
    assert (guided.images - full.images).abs().mean() < 0.2 * moved


def test_one_seed_per_prompt(pipe):
    with pytest.raises(ValueError, match="one seed per prompt: got 2 prompts and 1 seeds"):
        ltg.sample_pipeline(pipe, tiny_head(), PROMPTS[:2], [0])


@pytest.mark.skipif(os.environ.get("LTG_FULL_SD") != "1",
                    reason="set LTG_FULL_SD=1 (about 2.5 min and 14 GB on 2 CPU cores)")
def test_one_guided_step_at_full_sd14_shapes(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    pipe = ltg.load_pipeline(build_sd(tmp_path / "sd14", SD14))
    assert pipe.unet.config.cross_attention_dim == 768 and pipe.vae_scale_factor == 8
    out = ltg.sample_pipeline(pipe, tiny_head(), PROMPTS[:1], SEEDS[:1], ltg.Guidance(w=1.0, end=0.5),
                              num_inference_steps=2, progress=False)
    assert out.images.shape == (1, 3, 512, 512) and torch.isfinite(out.images).all()
    assert len(out.guidance_ratio) == 1
