"""Algorithm 1 on every diffusers family (families.py), each a tiny random pipeline loaded through
ltg.load_pipeline as a user loads the real model: w = 0 is the pipeline's own sampler (its DDIM
for the variance-preserving families, its flow-matching Euler for SD 3 and FLUX), guidance raises the
signal, w keeps its meaning with rescale, and a guidance decoder must match the family's latents."""

import json
import re

import pytest
import torch
from diffusers import AutoencoderTiny, DDIMScheduler, FlowMatchEulerDiscreteScheduler

import families
import ltg
from test_sampler import tiny_head
from tiny_pipelines import FAMILIES, GUIDANCE_SCALE, RESOLUTION

PROMPTS = [f"a photo of a {c}, a type of flower." for c in ("rose", "tulip", "daisy", "lily")]
SEEDS = [0, 1, 2, 3]
STEPS = 4
RECTIFIED_FLOW = ("sd3", "flux", "flux-schnell")


@pytest.fixture(scope="module")
def pipes(tiny_models):
    """`pipes(family)`: the family's tiny pipeline through ltg.load_pipeline, offline, loaded once per module."""
    return tiny_models.loader(lambda family, path: ltg.load_pipeline(path))


def sample(pipe, family, w=0.0, **kwargs):
    return ltg.sample_pipeline(pipe, tiny_head(), PROMPTS, SEEDS, ltg.Guidance(w=w, rescale=True), GUIDANCE_SCALE[family],
                               num_inference_steps=STEPS, resolution=RESOLUTION[family], progress=False, **kwargs)


@pytest.mark.parametrize("family", FAMILIES)
def test_zero_weight_is_the_pipelines_own_sampler(pipes, family):
    pipe = pipes(family)
    path = RECTIFIED_FLOW if family in RECTIFIED_FLOW else ()
    assert isinstance(pipe.scheduler, FlowMatchEulerDiscreteScheduler if path else DDIMScheduler)
    generators = [torch.Generator().manual_seed(s) for s in SEEDS]
    size = RESOLUTION[family]
    expected = pipe(PROMPTS, num_inference_steps=STEPS, guidance_scale=GUIDANCE_SCALE[family], generator=generators,
                    height=size, width=size, output_type="pt").images
    out = sample(pipe, family)
    assert out.images.shape == (4, 3, size, size)
    torch.testing.assert_close(out.images, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_guidance_raises_the_signal_and_w_is_its_share_of_eps(pipes, family):
    """Rescaled, the guidance term is w |eps| at every guided step (rectified flow's sigma = 1 step is not
    guided) and the mean signal over seeds rises with w."""
    pipe = pipes(family)
    unguided, guided = sample(pipe, family), sample(pipe, family, w=0.3)
    guided_steps = STEPS - (family in RECTIFIED_FLOW)
    torch.testing.assert_close(torch.tensor(guided.guidance_ratio), torch.full((guided_steps,), 0.3),
                               rtol=1e-4, atol=1e-6)
    assert torch.isfinite(guided.images).all() and guided.skipped.tolist() == [0] * 4
    assert guided.signal.mean() > unguided.signal.mean(), (guided.signal, unguided.signal)


@pytest.mark.parametrize("family", ["sd2-v", "sdxl", "sd3", "flux"])
def test_the_familys_tiny_decoder_guides(pipes, tiny_models, family):
    pipe = pipes(family)
    decoder = AutoencoderTiny.from_pretrained(tiny_models.decoder(family))
    plain, cheap = sample(pipe, family, w=0.3), sample(pipe, family, w=0.3, guidance_decoder=decoder)
    assert torch.isfinite(cheap.images).all()
    assert not torch.allclose(cheap.images, plain.images), "the guidance decoder was not used"
    assert not torch.allclose(cheap.images, sample(pipe, family).images), "the tiny decoder's gradient did not steer"


@pytest.mark.parametrize("family, decoder, message", [
    ("sdxl", dict(latent_channels=16), "reads 16 latent channels but the pipeline's VAE has 4"),
    ("flux", dict(latent_channels=4), "reads 4 latent channels but the pipeline's VAE has 16"),
    ("sd3", dict(latent_channels=16, scaling_factor=0.3611, shift_factor=0.1159),
     "unscales latents by (scale, shift) = (0.3611, 0.1159) but the pipeline's VAE by (1.5305, 0.0609)"),
])
def test_a_mismatched_guidance_decoder_is_refused(pipes, family, decoder, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        families.denoiser_for(pipes(family), PROMPTS[:1], guidance_decoder=AutoencoderTiny(**decoder))


def test_a_decoder_that_unscales_as_the_vae_does_is_taken(pipes):
    sd3 = pipes("sd3")
    decoder = AutoencoderTiny(latent_channels=16, scaling_factor=1.5305, shift_factor=0.0609)
    assert families.denoiser_for(sd3, PROMPTS[:1], guidance_decoder=decoder).guidance_vae is decoder


@pytest.mark.parametrize("family, decoder_id, message", [
    ("StableDiffusionXLPipeline", "madebyollin/taesd", "decodes SD 1.x / 2.x latents, not SDXL's: take madebyollin/taesdxl"),
    ("FluxPipeline", "madebyollin/taesd3", "decodes SD 3.x latents, not FLUX.1's: take madebyollin/taef1"),
    ("StableDiffusion3Pipeline", "madebyollin/taef1", "decodes FLUX.1 latents, not SD 3.x's: take madebyollin/taesd3"),
])
def test_another_familys_tiny_decoder_is_refused_by_its_hub_id(family, decoder_id, message):
    """TAESD and TAESDXL (TAESD3 and TAEF1) have the same config: their hub ids tell them apart."""
    with pytest.raises(ValueError, match=re.escape(message)):
        families.check_tiny_decoder_id(families.FAMILIES[family], decoder_id)
    for taken in (families.FAMILIES[family].tiny_decoder, "/my/own/tiny_decoder"):
        families.check_tiny_decoder_id(families.FAMILIES[family], taken)


def test_an_unsupported_pipeline_is_refused_in_one_line(tmp_path):
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "KandinskyPipeline"}))
    with pytest.raises(ValueError, match="is a KandinskyPipeline; Algorithm 1 supports StableDiffusionPipeline, "
                                         "StableDiffusionXLPipeline, StableDiffusion3Pipeline, FluxPipeline$"):
        ltg.load_pipeline(tmp_path)


@pytest.mark.parametrize("family, steps, scale", [("sd14", 50, 7.5), ("sdxl", 50, 5.0), ("sd3", 28, 3.5),
                                                  ("flux", 28, 3.5), ("flux-schnell", 4, 0.0)])
def test_each_family_has_its_model_cards_defaults(pipes, family, steps, scale):
    assert families.family_defaults(pipes(family)) == (steps, scale)


def test_flux_refuses_a_negative_prompt(pipes):
    with pytest.raises(ValueError, match="FLUX has no negative prompt"):
        families.denoiser_for(pipes("flux"), PROMPTS[:1], negative_prompt="blurry")


def test_sdxl_in_float16_decodes_in_float32(tiny_models, monkeypatch):
    """SDXL's VAE overflows in float16 (config.force_upcast): load_pipeline runs it in float32, as diffusers'
    SDXL pipeline does, so the guidance decode is float32 too; the UNet stays float16."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    pipe = ltg.load_pipeline(tiny_models.pipeline("sdxl"), dtype=torch.float16)
    assert pipe.vae.config.force_upcast and pipe.vae.dtype == torch.float32 and pipe.unet.dtype == torch.float16
    out = sample(pipe, "sdxl", w=0.3)
    assert torch.isfinite(out.images).all() and out.skipped.tolist() == [0] * 4
    torch.testing.assert_close(torch.tensor(out.guidance_ratio), torch.full((STEPS,), 0.3), rtol=1e-3, atol=1e-5)


@pytest.mark.parametrize("scheduler, prediction, message", [
    (FlowMatchEulerDiscreteScheduler(stochastic_sampling=True), "flow", "stochastic_sampling=True"),
    (FlowMatchEulerDiscreteScheduler(), "epsilon", "needs a velocity \\('flow'\\) model"),
    (DDIMScheduler(prediction_type="v_prediction", clip_sample=False), "flow", "matching its prediction_type"),
])
def test_the_sampler_refuses_a_scheduler_it_cannot_follow(scheduler, prediction, message):
    with pytest.raises(ValueError, match=message):
        ltg.check_scheduler(scheduler, prediction)


def test_zero_terminal_snr_needs_a_model_that_predicts_more_than_eps():
    z = torch.randn(1, 4, 2, 2)
    eps, zhat0 = ltg.epsilon_and_clean_latent(z, torch.ones_like(z), "v_prediction", 0.0, 1.0)
    assert torch.equal(eps, z) and torch.equal(zhat0, -torch.ones_like(z))     # a_t = 0: eps = z_t, zhat0 = -v
    with pytest.raises(ValueError, match="says nothing of x0 at a_t = 0"):
        ltg.epsilon_and_clean_latent(z, z, "epsilon", 0.0, 1.0)
