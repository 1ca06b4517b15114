"""Algorithm 1 on a pixel-space class-conditional model (D = identity) and on a tiny
Stable-Diffusion-shaped pipeline loaded through `from_pretrained`, as a user loads SD 1.4."""

import pytest
import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler, PNDMScheduler, UNet2DModel
from torch import nn

import ltg

SCHEDULER = dict(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                 clip_sample=False, set_alpha_to_one=False, steps_offset=1)


def tiny_unet(seed=0):
    torch.manual_seed(seed)
    return UNet2DModel(sample_size=8, in_channels=3, out_channels=3, block_out_channels=(16, 32),
                       layers_per_block=1, down_block_types=("DownBlock2D", "DownBlock2D"),
                       up_block_types=("UpBlock2D", "UpBlock2D"), num_class_embeds=4, norm_num_groups=8).eval()


def tiny_head(seed=0, classes=3, sharpness=20.0):
    """A random CNN whose last layer is scaled up so its predictions are not all near-uniform."""
    torch.manual_seed(seed)
    cnn = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(),
                        nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, classes))
    with torch.no_grad():
        cnn[-1].weight.mul_(sharpness)
    return ltg.EpistemicHead(cnn, num_samples=6).eval()


def plain_ddim(unet, labels, seeds, steps, guidance_scale):
    """diffusers' own DDIM loop with classifier-free guidance on a class-conditional UNet."""
    scheduler = DDIMScheduler(**SCHEDULER)
    scheduler.set_timesteps(steps)
    z = torch.cat([torch.randn(1, 3, 8, 8, generator=torch.Generator().manual_seed(s)) for s in seeds])
    labels = torch.tensor(labels)
    with torch.no_grad():
        for t in scheduler.timesteps:
            uncond, cond = unet(torch.cat([z, z]), t, class_labels=torch.cat([torch.full_like(labels, 3), labels])
                                ).sample.chunk(2)
            z = scheduler.step(uncond + guidance_scale * (cond - uncond), t, z, eta=0.0).prev_sample
    return (z / 2 + 0.5).clamp(0, 1)


def test_zero_weight_is_plain_ddim_in_pixel_space():
    unet, head = tiny_unet(), tiny_head()
    out = ltg.sample_class_conditional(unet, DDIMScheduler(**SCHEDULER), head, [0, 1, 2], [5, 6, 7],
                                       ltg.Guidance(w=0.0), guidance_scale=2.0, num_inference_steps=8, progress=False)
    expected = plain_ddim(unet, [0, 1, 2], [5, 6, 7], 8, 2.0)
    torch.testing.assert_close(out.images, expected, rtol=1e-5, atol=1e-5)
    assert out.guidance_ratio == [] and out.skipped.tolist() == [0, 0, 0]


def test_image_is_reproducible_whatever_the_batch():
    unet, head = tiny_unet(), tiny_head()
    run = lambda labels, seeds: ltg.sample_class_conditional(  # noqa: E731
        unet, DDIMScheduler(**SCHEDULER), head, labels, seeds, ltg.Guidance(w=2.0), num_inference_steps=5,
        progress=False)
    alone = run([1], [42])
    batched = run([0, 1, 2], [7, 42, 9])
    torch.testing.assert_close(batched.images[1:2], alone.images, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(batched.signal[1:2], alone.signal, rtol=1e-4, atol=1e-5)


def mean_final_signal(w, seeds, **guidance):
    unet, head = tiny_unet(), tiny_head()
    out = ltg.sample_class_conditional(unet, DDIMScheduler(**SCHEDULER), head, [s % 3 for s in seeds], seeds,
                                       ltg.Guidance(w=w, **guidance), guidance_scale=2.0, num_inference_steps=10,
                                       progress=False)
    return out.signal.mean().item()


@pytest.mark.parametrize("guidance", [{}, {"rescale": True}, {"through_unet": True}, {"signal": "epistemic"}],
                         ids=["default", "rescale", "through-unet", "epistemic"])
def test_signal_rises_with_weight(guidance):
    """Over 12 seeds, the mean final signal increases along w = 0 < small < larger."""
    seeds = list(range(12))
    ws = (0.0, 0.2, 1.0) if guidance.get("rescale") else (0.0, 10.0, 50.0)
    means = [mean_final_signal(w, seeds, **guidance) for w in ws]
    assert means[0] < means[1] < means[2], f"mean signal at w={ws}: {means}"


@pytest.mark.parametrize("kind", ltg.SIGNALS)
def test_output_carries_every_signal_of_the_final_images(kind):
    unet, head = tiny_unet(), tiny_head()
    out = ltg.sample_class_conditional(unet, DDIMScheduler(**SCHEDULER), head, [0, 1, 2], [0, 1, 2],
                                       ltg.Guidance(w=5.0, signal=kind), num_inference_steps=3, progress=False)
    total, aleatoric, epistemic = ltg.longtail_signals(head(out.images))
    assert set(out.signals) == set(ltg.SIGNALS)
    torch.testing.assert_close(out.signals["total"], total)
    torch.testing.assert_close(out.signals["aleatoric"], aleatoric)
    torch.testing.assert_close(out.signals["total"], out.signals["epistemic"] + out.signals["aleatoric"])
    assert torch.equal(out.signal, out.signals[kind])


def test_guidance_window_and_every_select_steps():
    g = ltg.Guidance(w=1.0, start=0.2, end=0.8, every=2)
    assert [i for i in range(10) if g.guides(i, 10)] == [2, 4, 6]
    assert not any(ltg.Guidance(w=0.0).guides(i, 10) for i in range(10))


@pytest.mark.parametrize("kwargs, message", [
    (dict(w=-1.0), "w must be finite and >= 0"), (dict(signal="entropy"), "unknown signal 'entropy'"),
    (dict(start=0.5, end=0.5), "guidance window"), (dict(every=0), "every must be >= 1"),
])
def test_guidance_refuses_bad_values(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ltg.Guidance(**kwargs)


def test_sampler_refuses_unsupported_schedulers():
    unet, head = tiny_unet(), tiny_head()
    for scheduler, message in ((DDIMScheduler(**(SCHEDULER | {"clip_sample": True})), "must not clip"),
                               (DDIMScheduler(**(SCHEDULER | {"prediction_type": "v_prediction"})),
                                "matching its prediction_type; got 'epsilon'"),
                               (PNDMScheduler(), "needs a DDIMScheduler or a FlowMatchEulerDiscreteScheduler, got PNDM")):
        with pytest.raises(ValueError, match=message):
            ltg.sample_class_conditional(unet, scheduler, head, [0], [0], progress=False)


# --- the gradient the sampler applies ----------------------------------------------------------

@pytest.mark.parametrize("through_unet", [False, True])
def test_gradient_equals_finite_differences_in_float64(through_unet):
    unet, head = tiny_unet().double(), tiny_head().double()
    labels = torch.tensor([0, 2])
    denoiser = ltg.ClassConditionalDenoiser(unet, DDIMScheduler(**SCHEDULER), labels, guidance_scale=2.0)
    signal_fn = ltg.image_signal(head, lambda x: x, "total")
    g = torch.Generator().manual_seed(0)
    z, t, abar_t = torch.randn(2, 3, 8, 8, generator=g, dtype=torch.float64), torch.tensor(500), 0.3
    step = ltg.PathStep(t, *ltg.vp_coefficients(abar_t), *ltg.vp_coefficients(0.5))
    _, grad = ltg.longtail_gradient(denoiser, signal_fn, z, step, through_unet)
    eps_fixed = denoiser.predict(z, t).detach()

    def f(z):  # sum_b f_lt(D(zhat0(z)))
        eps = denoiser.predict(z, t) if through_unet else eps_fixed
        return signal_fn(denoiser.guidance_decode(ltg.predict_clean_latent(z, eps, abar_t))).sum()

    with torch.no_grad():
        for _ in range(3):
            v = torch.randn(z.shape, generator=g, dtype=torch.float64)
            h = 1e-6
            fd = (f(z + h * v) - f(z - h * v)) / (2 * h)
            torch.testing.assert_close((grad * v).sum(), fd, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_predictor_preprocess_is_a_differentiable_resize_and_normalisation(dtype):
    x = torch.rand(2, 3, 64, 48, generator=torch.Generator().manual_seed(0)).to(dtype).requires_grad_()
    mean, std = torch.tensor(ltg.IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(ltg.IMAGENET_STD).view(1, 3, 1, 1)
    expected = (F.interpolate(x.detach().float(), size=(32, 32), mode="bilinear", antialias=True) - mean) / std
    y = ltg.predictor_preprocess(32)(x)                                                  # [2, 3, 32, 32]
    assert y.dtype == torch.float32
    assert torch.equal(y, expected)
    y.square().sum().backward()
    assert x.grad.dtype == dtype and torch.isfinite(x.grad).all() and (x.grad != 0).all()


class Spy(nn.Module):
    """Records every input the predictor sees."""

    def __init__(self, predictor):
        super().__init__()
        self.predictor, self.seen = predictor, []

    def forward(self, x):
        self.seen.append(x.detach().clone())
        return self.predictor(x)


class RecordingDenoiser(ltg.ClassConditionalDenoiser):
    """Records every (z_t, eps) the sampler asks for."""

    def __init__(self, *args):
        super().__init__(*args)
        self.calls = []

    def predict(self, z, t):
        eps = super().predict(z, t)
        self.calls.append((z.detach().clone(), eps.detach().clone(), int(t)))
        return eps


def test_predictor_only_sees_decoded_clean_estimates():
    unet, head = tiny_unet(), tiny_head()
    head.predictor = Spy(head.predictor)
    scheduler = DDIMScheduler(**SCHEDULER)
    denoiser = RecordingDenoiser(unet, scheduler, torch.tensor([0, 1]), 2.0)
    generators = [torch.Generator().manual_seed(s) for s in (0, 1)]
    out = ltg.sample(denoiser, head, generators, ltg.Guidance(w=1.0, every=2), num_inference_steps=6, progress=False)
    guided = [call for i, call in enumerate(denoiser.calls) if i % 2 == 0]
    assert len(head.predictor.seen) == len(guided) + 1
    for seen, (z, eps, t) in zip(head.predictor.seen, guided):
        zhat0 = ltg.predict_clean_latent(z, eps, float(scheduler.alphas_cumprod[t]))   # Eqn 8
        torch.testing.assert_close(seen, (zhat0 + 1) / 2, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(head.predictor.seen[-1], out.images)


class PoisonOnce(nn.Module):
    """On its `call`-th call, returns NaN logits for image `index`."""

    def __init__(self, predictor, call, index):
        super().__init__()
        self.predictor, self.call, self.index, self.calls = predictor, call, index, 0

    def forward(self, x):
        self.calls += 1
        logits = self.predictor(x)
        if self.calls == self.call:
            logits = logits.clone()
            logits[self.index] = float("nan")
        return logits


def test_non_finite_gradient_is_skipped_and_reported():
    unet, head = tiny_unet(), tiny_head()
    head.predictor = PoisonOnce(head.predictor, call=2, index=1)
    out = ltg.sample_class_conditional(unet, DDIMScheduler(**SCHEDULER), head, [0, 1, 2], [0, 1, 2],
                                       ltg.Guidance(w=3.0), num_inference_steps=5, progress=False)
    assert torch.isfinite(out.images).all()
    assert out.skipped.tolist() == [0, 1, 0]
