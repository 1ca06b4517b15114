"""Property tests of the guidance math: Eqn 4 (the longtail signal) and Eqns 11, 8, 7 (the guided
update: the paper's DDIM step, and the same step on any Gaussian path z_t = a_t x0 + b_t eps, checked
against diffusers' DDIM with v-prediction and rectified flow's Euler step), for the pure-torch
reference and the fused kernels.

Each property is a `check_*` function used twice: on the real implementation, where it must hold,
and on a deliberately wrong one (test_checks_catch_wrong_implementations,
test_path_checks_catch_wrong_implementations), where it must fail.
"""

import math

import pytest
import torch
from diffusers import DDIMScheduler, FlowMatchEulerDiscreteScheduler
from hypothesis import given, strategies as st
from tiny_sd import SD14_SCHEDULER

import ltg

DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() and ltg.backend("cuda") == "fused" else [])


def tol(dtype):
    """Tolerances that follow from the dtype. Half types: both sides compute in float32 and round
    once, so they differ by at most an ulp. float32/64: sums over up to C + K terms in any order."""
    eps = torch.finfo(dtype).eps
    factor = 2 if dtype in (torch.float16, torch.bfloat16) else 64
    return dict(rtol=factor * eps, atol=factor * eps)


def random_logits(seed, K, B, C, scale, dtype=torch.float64, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    return (scale * torch.randn(K, B, C, generator=g, dtype=torch.float64)).to(dtype).to(device)


logit_cases = st.tuples(st.integers(0, 2**31 - 1), st.integers(1, 8), st.integers(1, 4),
                        st.integers(2, 40), st.sampled_from([0.01, 1.0, 10.0, 100.0]))


def signals(logits):
    return ltg.longtail_signals(logits.double(), fused=False)


# --- Eqn 4: properties of (total, aleatoric, epistemic) --------------------------------------

def check_decomposition_and_bounds(signals_fn, logits):
    total, aleatoric, epistemic = signals_fn(logits)
    C = logits.shape[-1]
    torch.testing.assert_close(total, aleatoric + epistemic, rtol=1e-12, atol=1e-12)
    slack = 1e-9
    assert (aleatoric >= -slack).all(), "aleatoric < 0"
    assert (epistemic >= -slack).all(), "epistemic < 0"
    assert (epistemic <= total + slack).all(), "epistemic > total"
    assert (total <= math.log(C) + slack).all(), "total > log C"


def check_zero_epistemic_for_identical_members(signals_fn, logits):
    identical = logits[:1].expand_as(logits).contiguous()
    _, aleatoric, epistemic = signals_fn(identical)
    torch.testing.assert_close(epistemic, torch.zeros_like(epistemic), rtol=0, atol=1e-9)
    _, aleatoric_one, _ = signals_fn(logits[:1])
    torch.testing.assert_close(aleatoric, aleatoric_one, rtol=1e-9, atol=1e-9)


def check_invariances(signals_fn, logits, seed):
    g = torch.Generator().manual_seed(seed)
    K, B, C = logits.shape
    reference = torch.stack(signals_fn(logits))
    classes = logits[:, :, torch.randperm(C, generator=g)]
    members = logits[torch.randperm(K, generator=g)]
    shifted = logits + 50 * torch.randn(1, B, 1, generator=g, dtype=logits.dtype)
    for name, variant in (("class permutation", classes), ("member permutation", members),
                          ("per-sample constant", shifted)):
        torch.testing.assert_close(torch.stack(signals_fn(variant.contiguous())), reference,
                                   rtol=1e-9, atol=1e-9, msg=lambda m: f"not invariant to {name}: {m}")


def check_known_values(signals_fn):
    uniform = torch.zeros(3, 1, 5, dtype=torch.float64)
    for u in signals_fn(uniform)[:2]:
        torch.testing.assert_close(u, torch.full((1,), math.log(5), dtype=torch.float64))
    # two confident members that disagree: no aleatoric, log 2 of epistemic uncertainty
    disagree = torch.tensor([[[60.0, 0.0]], [[0.0, 60.0]]], dtype=torch.float64)
    total, aleatoric, epistemic = signals_fn(disagree)
    torch.testing.assert_close(total, torch.full((1,), math.log(2), dtype=torch.float64))
    torch.testing.assert_close(aleatoric, torch.zeros(1, dtype=torch.float64), atol=1e-20, rtol=0)
    torch.testing.assert_close(epistemic, torch.full((1,), math.log(2), dtype=torch.float64))
    # one unsure member, one sure: aleatoric is their mean entropy
    mixed = torch.tensor([[[0.0, 0.0, 0.0, 0.0]], [[80.0, 0.0, 0.0, 0.0]]], dtype=torch.float64)
    torch.testing.assert_close(signals_fn(mixed)[1], torch.full((1,), math.log(4) / 2, dtype=torch.float64))


@given(logit_cases)
def test_signals_decompose_and_are_bounded(case):
    seed, K, B, C, scale = case
    check_decomposition_and_bounds(signals, random_logits(seed, K, B, C, scale))


@given(logit_cases)
def test_identical_members_or_one_member_have_no_epistemic_uncertainty(case):
    seed, K, B, C, scale = case
    check_zero_epistemic_for_identical_members(signals, random_logits(seed, K, B, C, scale))


@given(logit_cases)
def test_signals_are_invariant_to_permutations_and_shifts(case):
    seed, K, B, C, scale = case
    check_invariances(signals, random_logits(seed, K, B, C, scale), seed)


def test_signals_known_values():
    check_known_values(signals)


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
def test_signals_are_finite_for_extreme_logits(fused, dtype):
    logits = random_logits(0, 64, 4, 1000, 1e4).clamp(-1e4, 1e4).to(dtype).requires_grad_()
    outputs = ltg.longtail_signals(logits, fused=fused)
    sum(u.float().sum() for u in outputs).backward()
    assert all(torch.isfinite(u).all() for u in outputs)
    assert torch.isfinite(logits.grad).all()


def test_signal_selection():
    logits = random_logits(1, 4, 3, 7, 1.0)
    total, aleatoric, epistemic = ltg.longtail_signals(logits)
    for name, expected in (("total", total), ("aleatoric", aleatoric), ("epistemic", epistemic)):
        torch.testing.assert_close(ltg.longtail_signal(logits, name), expected)
    with pytest.raises(ValueError, match="unknown signal 'entropy'"):
        ltg.longtail_signal(logits, "entropy")


@pytest.mark.parametrize("bad, message", [
    (torch.zeros(2, 3), r"shape \[K, B, C\]"),
    (torch.zeros(2, 3, 4, dtype=torch.int64), "floating tensor"),
    (torch.zeros(0, 3, 4), "non-empty"),
])
def test_signals_refuse_bad_logits(bad, message):
    with pytest.raises((ValueError, TypeError), match=message):
        ltg.longtail_signals(bad)


# --- Eqn 4: the fused kernel against the reference -------------------------------------------

def check_fused_signals_match_reference(fused_fn, logits):
    x_fused = logits.clone().requires_grad_()
    x_ref = logits.clone().requires_grad_()
    out_fused = fused_fn(x_fused)
    out_ref = ltg.longtail_signals(x_ref, fused=False)
    for a, b in zip(out_fused, out_ref):
        torch.testing.assert_close(a, b, **tol(logits.dtype))
    g = torch.Generator().manual_seed(7)
    upstream = [torch.randn(logits.shape[1], generator=g).to(logits.dtype).to(logits.device) for _ in range(3)]
    torch.autograd.backward(out_fused, upstream)
    torch.autograd.backward(out_ref, upstream)
    # Each gradient entry sums terms p * (1 + |log p|) / K times an upstream value, with |log p| at
    # most log(KC) plus the logits' range: rounding error follows their size, which can be much
    # larger than the gradient itself (near-uniform or near-one-hot members).
    K, _, C = logits.shape
    spread = (logits.max() - logits.min()).item()
    terms = max(u.abs().max().item() for u in upstream) * (1 + math.log(K * C) + spread) / K
    scale = max(x_ref.grad.abs().max().item(), terms)
    torch.testing.assert_close(x_fused.grad / scale, x_ref.grad / scale, **tol(logits.dtype))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@given(case=logit_cases)
def test_fused_signals_equal_reference(device, dtype, case):
    seed, K, B, C, scale = case
    logits = random_logits(seed, K, B, C, scale, dtype, device)
    check_fused_signals_match_reference(lambda x: ltg.longtail_signals(x, fused=True), logits)


@given(logit_cases)
def test_fused_signals_have_the_properties(case):
    seed, K, B, C, scale = case
    fused = lambda x: ltg.longtail_signals(x, fused=True)  # noqa: E731
    logits = random_logits(seed, K, B, C, scale)
    check_decomposition_and_bounds(fused, logits)
    check_zero_epistemic_for_identical_members(fused, logits)
    check_invariances(fused, logits, seed)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", [(1, 2, 3), (3, 2, 5), (4, 1, 7)])
def test_fused_signals_backward_gradcheck(device, shape):
    logits = random_logits(3, *shape, 2.0, torch.float64, device).requires_grad_()
    assert torch.autograd.gradcheck(lambda x: ltg.longtail_signals(x, fused=True), (logits,))


# --- Eqns 11, 8, 7: the guided DDIM update ----------------------------------------------------

step_cases = st.tuples(st.integers(0, 2**31 - 1),
                       st.lists(st.integers(1, 9), min_size=1, max_size=4),
                       st.integers(0, 49),
                       st.floats(-10, 10, allow_nan=False))


def sd14_scheduler(steps=50):
    scheduler = DDIMScheduler(**SD14_SCHEDULER)
    scheduler.set_timesteps(steps)
    return scheduler


def random_step_inputs(seed, shape, dtype=torch.float64, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g, dtype=torch.float64).to(dtype).to(device) for _ in range(3)]


def check_plain_ddim_at_zero_weight(step_fn, seed, shape, index):
    scheduler = sd14_scheduler()
    t = scheduler.timesteps[index]
    z, eps, grad = random_step_inputs(seed, shape)
    expected = scheduler.step(eps, t, z, eta=0.0).prev_sample
    # diffusers takes square roots of the float32 alphas_cumprod in float32: agreement to ~1e-7
    torch.testing.assert_close(step_fn(z, eps, grad, *ltg.ddim_alphas(scheduler, t), 0.0), expected,
                               rtol=1e-6, atol=1e-6)


def check_affine_in_weight(step_fn, seed, shape, w):
    z, eps, grad = random_step_inputs(seed, shape)
    abar_t, abar_prev = 0.3, 0.6
    at = lambda v: step_fn(z, eps, grad, abar_t, abar_prev, v)  # noqa: E731
    slope = at(1.0) - at(0.0)
    torch.testing.assert_close(at(w), at(0.0) + w * slope, rtol=1e-10, atol=1e-10)


def check_last_step_returns_clean_estimate(step_fn, seed, shape, w):
    z, eps, grad = random_step_inputs(seed, shape)
    abar_t = 0.7
    eps_hat = eps - w * math.sqrt(1 - abar_t) * grad                       # Eqn 11
    torch.testing.assert_close(step_fn(z, eps, grad, abar_t, 1.0, w),
                               ltg.predict_clean_latent(z, eps_hat, abar_t), rtol=1e-12, atol=1e-12)


def reference_step(*args):
    return ltg.guided_ddim_step(*args, fused=False)


def fused_step(*args):
    return ltg.guided_ddim_step(*args, fused=True)


@pytest.mark.parametrize("step_fn", [reference_step, fused_step], ids=["reference", "fused"])
@given(case=step_cases)
def test_guided_step_properties(step_fn, case):
    seed, shape, index, w = case
    check_plain_ddim_at_zero_weight(step_fn, seed, shape, index)
    check_affine_in_weight(step_fn, seed, shape, w)
    check_last_step_returns_clean_estimate(step_fn, seed, shape, w)


def test_plain_ddim_over_a_whole_trajectory():
    """w = 0 run for all 50 steps on a toy noise model stays on diffusers' DDIM trajectory."""
    scheduler = sd14_scheduler()
    z = ours = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    for t in scheduler.timesteps:
        model = lambda x: 0.5 * torch.tanh(x) + 0.1 * t / 1000  # noqa: E731
        z = scheduler.step(model(z), t, z, eta=0.0).prev_sample
        ours = ltg.guided_ddim_step(ours, model(ours), torch.zeros_like(ours), *ltg.ddim_alphas(scheduler, t), 0.0)
    torch.testing.assert_close(ours, z, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kwargs, message", [
    (dict(abar_t=0.0), r"abar_t must lie in \(0, 1\], got 0.0"),
    (dict(abar_prev=1.5), r"abar_prev must lie in \(0, 1\], got 1.5"),
    (dict(w=float("nan")), "w must be finite, got nan"),
    (dict(grad=torch.zeros(2, 3)), "grad must match z_t"),
    (dict(eps=torch.zeros(2, 4, dtype=torch.float16)), "eps must match z_t"),
])
def test_guided_step_refuses_bad_inputs(kwargs, message):
    args = dict(z_t=torch.zeros(2, 4), eps=torch.zeros(2, 4), grad=torch.zeros(2, 4),
                abar_t=0.5, abar_prev=0.6, w=1.0) | kwargs
    with pytest.raises(ValueError, match=message):
        ltg.guided_ddim_step(**args)


# --- Eqns 11, 8, 7 on any Gaussian path z_t = a_t x0 + b_t eps -------------------------------

def reference_path_step(*args, **kwargs):
    return ltg.gaussian_path_step(*args, fused=False, **kwargs)


def fused_path_step(*args, **kwargs):
    return ltg.gaussian_path_step(*args, fused=True, **kwargs)


def vp_path(abar_t, abar_prev):
    return (*ltg.vp_coefficients(abar_t), *ltg.vp_coefficients(abar_prev))


def flow_path(sigma, sigma_prev):
    return (*ltg.rectified_flow_coefficients(sigma), *ltg.rectified_flow_coefficients(sigma_prev))


# (a_t, b_t, a_prev, b_prev) of steps that remove noise, a_t and b_t > 0: VP from abar_t towards 1,
# rectified flow from sigma towards 0
denoising_paths = st.one_of(
    st.tuples(st.floats(0.05, 0.95), st.floats(0.05, 1.0)).map(
        lambda p: vp_path(p[0], min(1.0, p[0] + (1 - p[0]) * p[1]))),
    st.tuples(st.floats(0.05, 0.95), st.floats(0.0, 0.95)).map(lambda p: flow_path(p[0], p[0] * p[1])))


def ddim_step_in_abar(z, eps, grad, abar_t, abar_prev, w):
    """The DDIM step written in abar, as ltg computed it before the general path, in the reference's precision."""
    z_, e, g = (u.to(ltg._compute_dtype(z.dtype)) for u in (z, eps, grad))
    eps_hat = e - w * math.sqrt(1.0 - abar_t) * g                                     # Eqn 11
    z0 = (z_ - math.sqrt(1.0 - abar_t) * eps_hat) / math.sqrt(abar_t)                 # Eqn 8
    return (math.sqrt(abar_prev) * z0 + math.sqrt(1.0 - abar_prev) * eps_hat).to(z.dtype)  # Eqn 7


def check_vp_case_is_the_ddim_step(step_fn, seed, shape, abar_t, abar_prev, w, dtype):
    """The VP coefficients give the DDIM step bit for bit: the generalisation changed no VP result."""
    z, eps, grad = random_step_inputs(seed, shape, dtype)
    assert torch.equal(step_fn(z, eps, grad, *vp_path(abar_t, abar_prev), w),
                       ddim_step_in_abar(z, eps, grad, abar_t, abar_prev, w))


@pytest.mark.parametrize("dtype", DTYPES)
@given(case=step_cases, abar_t=st.floats(1e-4, 1.0), abar_prev=st.floats(1e-4, 1.0))
def test_vp_coefficients_reproduce_the_ddim_step_bit_for_bit(dtype, case, abar_t, abar_prev):
    seed, shape, _, w = case
    check_vp_case_is_the_ddim_step(reference_path_step, seed, shape, abar_t, abar_prev, w, dtype)
    z, eps, grad = random_step_inputs(seed, shape, dtype)
    assert torch.equal(ltg.guided_ddim_step(z, eps, grad, abar_t, abar_prev, w, fused=False),
                       ddim_step_in_abar(z, eps, grad, abar_t, abar_prev, w))
    assert torch.equal(ltg.predict_clean_latent(z, eps, abar_t),
                       (z - math.sqrt(1.0 - abar_t) * eps) / math.sqrt(abar_t))


def euler_step_through_eps(step_fn, coefficients=ltg.rectified_flow_coefficients,
                           to_eps=ltg.epsilon_from_velocity, to_clean=ltg.clean_latent_from_velocity):
    """A velocity model's rectified-flow step (z, u, sigma, sigma_prev) -> z_prev through the general step at
    w = 0: eps = z + (1 - sigma) u, and at sigma = 1 the clean estimate z - sigma u."""
    def step(z, u, sigma, sigma_prev):
        a_t, b_t = coefficients(sigma)
        z0 = to_clean(z, u, sigma) if a_t == 0.0 else None
        return step_fn(z, to_eps(z, u, sigma), torch.zeros_like(z), a_t, b_t, *coefficients(sigma_prev), 0.0, z0=z0)
    return step


def check_flow_step_is_the_diffusers_euler_step(flow_step, seed, shape, steps, index, shift):
    scheduler = FlowMatchEulerDiscreteScheduler(shift=shift)
    scheduler.set_timesteps(steps)
    g = torch.Generator().manual_seed(seed)
    z, u = (torch.randn(shape, generator=g).double() for _ in range(2))   # float32 values: exact in its upcast
    expected = scheduler.step(u, scheduler.timesteps[index], z).prev_sample   # z + (sigma_prev - sigma) u
    ours = flow_step(z, u, scheduler.sigmas[index], scheduler.sigmas[index + 1])
    assert torch.isfinite(ours).all()
    # diffusers computes sigma_prev - sigma in float32: agreement to ~1e-7
    torch.testing.assert_close(ours, expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("step_fn", [reference_path_step, fused_path_step], ids=["reference", "fused"])
@given(seed=st.integers(0, 2**31 - 1), shape=st.lists(st.integers(1, 9), min_size=1, max_size=4),
       steps=st.integers(1, 30), position=st.floats(0, 1, exclude_max=True), shift=st.sampled_from([1.0, 3.0]))
def test_rectified_flow_coefficients_give_the_diffusers_euler_step(step_fn, seed, shape, steps, position, shift):
    """Eqn 7 on the rectified-flow path is FlowMatchEulerDiscreteScheduler's step, the first one
    (sigma = 1, a_t = 0) included."""
    for index in (0, int(position * steps)):
        check_flow_step_is_the_diffusers_euler_step(euler_step_through_eps(step_fn), seed, shape, steps, index,
                                                    shift)


def test_plain_euler_over_a_whole_trajectory():
    """w = 0 run for all 28 steps of an SD3-shifted schedule on a toy velocity model stays on diffusers'
    Euler trajectory."""
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    scheduler.set_timesteps(28)
    flow_step = euler_step_through_eps(ltg.gaussian_path_step)
    z = ours = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0)).double()
    for i, t in enumerate(scheduler.timesteps):
        model = lambda x: 0.5 * torch.tanh(x) - 0.1 * t / 1000  # noqa: E731
        z = scheduler.step(model(z), t, z).prev_sample
        ours = flow_step(ours, model(ours), scheduler.sigmas[i], scheduler.sigmas[i + 1])
    torch.testing.assert_close(ours, z, rtol=1e-5, atol=1e-5)


def v_step_through_eps(step_fn, to_eps=ltg.epsilon_from_v):
    """A v-prediction model's DDIM step (z, v, abar_t, abar_prev) -> z_prev through the general step at w = 0."""
    def step(z, v, abar_t, abar_prev):
        a_t, b_t = ltg.vp_coefficients(abar_t)
        return step_fn(z, to_eps(z, v, a_t, b_t), torch.zeros_like(z), a_t, b_t, *ltg.vp_coefficients(abar_prev),
                       0.0)
    return step


def check_v_step_is_the_diffusers_ddim_step(v_step, seed, shape, index):
    scheduler = DDIMScheduler(**(SD14_SCHEDULER | {"prediction_type": "v_prediction"}))
    scheduler.set_timesteps(50)
    t = scheduler.timesteps[index]
    z, v, _ = random_step_inputs(seed, shape)
    expected = scheduler.step(v, t, z, eta=0.0).prev_sample
    torch.testing.assert_close(v_step(z, v, *ltg.ddim_alphas(scheduler, t)), expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("step_fn", [reference_path_step, fused_path_step], ids=["reference", "fused"])
@given(case=step_cases)
def test_epsilon_from_v_gives_the_diffusers_v_prediction_ddim_step(step_fn, case):
    seed, shape, index, _ = case
    check_v_step_is_the_diffusers_ddim_step(v_step_through_eps(step_fn), seed, shape, index)


def quadratic_signal(z0):
    """A smooth signal of the clean estimate, [B, ...] -> [B]: f(z0) = <c, z0> - ||z0||^2 / 4 for a fixed c."""
    c = torch.linspace(-1, 1, z0[0].numel(), dtype=z0.dtype).view(z0[0].shape)
    return (c * z0 - z0.square() / 4).flatten(1).sum(1)


def check_bias_raises_signal_to_first_order(step_fn, seed, shape, path):
    """Eqn 11 raises the signal by the amount its derivation gives. With grad = grad_{z_t} f(zhat0) =
    grad_{zhat0} f / a_t (eps held constant), the bias -w b_t grad of eps moves
      z_prev by w kappa grad, kappa = b_t (a_prev b_t - a_t b_prev) / a_t > 0 for a step that removes noise;
      the clean estimate of z_prev (eps_hat held constant) by w (b_t / a_t)^2 grad_{zhat0} f, so that
      f(zhat0(z_prev(w))) - f(zhat0(z_prev(0))) = w (b_t / a_t)^2 ||grad_{zhat0} f||^2 + O(w^2) > 0.
    For a quadratic f a central difference gives the first-order term exactly."""
    a_t, b_t, a_prev, b_prev = path
    z, eps, _ = random_step_inputs(seed, shape)
    z0 = ltg.clean_latent(z, eps, a_t, b_t).requires_grad_()                   # Eqn 8
    df, = torch.autograd.grad(quadratic_signal(z0).sum(), z0)                   # grad_{zhat0} f, [B, ...]
    grad = df / a_t
    kappa = b_t * (a_prev * b_t - a_t * b_prev) / a_t
    assert kappa > 0
    z_prev0 = step_fn(z, eps, grad, *path, 0.0)
    torch.testing.assert_close(step_fn(z, eps, grad, *path, 1.0) - z_prev0, kappa * grad, rtol=1e-9, atol=1e-9)

    def signal_after_step(w):
        z_prev, eps_hat = step_fn(z, eps, grad, *path, w, True)
        return quadratic_signal(ltg.clean_latent(z_prev, eps_hat, a_prev, b_prev))

    w = 1e-2 * (a_t / b_t) ** 2                                                 # moves zhat0 by 1e-2 grad_{zhat0} f
    first_order = w * (b_t / a_t) ** 2 * df.flatten(1).square().sum(1)
    torch.testing.assert_close((signal_after_step(w) - signal_after_step(-w)) / 2, first_order, rtol=1e-8, atol=0)
    assert (signal_after_step(w) > signal_after_step(0.0)).all(), "guidance lowered the signal"


@pytest.mark.parametrize("step_fn", [reference_path_step, fused_path_step], ids=["reference", "fused"])
@given(seed=st.integers(0, 2**31 - 1), batch=st.integers(1, 4), path=denoising_paths)
def test_guidance_raises_the_signal_to_first_order(step_fn, seed, batch, path):
    check_bias_raises_signal_to_first_order(step_fn, seed, (batch, 2, 3), path)


@given(seed=st.integers(0, 2**31 - 1), batch=st.integers(1, 4), path=denoising_paths,
       w=st.floats(0.01, 1.0))
def test_rescaled_guidance_is_a_share_w_of_the_noise_estimate(seed, batch, path, w):
    """With rescale_gradient, Eqn 11's bias has norm w ||eps|| per sample, whatever the path."""
    z, eps, grad = random_step_inputs(seed, (batch, 2, 3))
    _, eps_hat = reference_path_step(z, eps, ltg.rescale_gradient(grad, eps, path[1]), *path, w, True)
    torch.testing.assert_close((eps - eps_hat).flatten(1).norm(dim=1), w * eps.flatten(1).norm(dim=1),
                               rtol=1e-6, atol=0)


@pytest.mark.parametrize("kwargs, message", [
    (dict(a_t=-0.1), "a_t must be finite and >= 0, got -0.1"),
    (dict(b_prev=float("inf")), "b_prev must be finite and >= 0, got inf"),
    (dict(a_t=0.0), "pass the clean estimate z0"),
    (dict(a_t=0.0, z0=torch.zeros(2, 4)), "guidance is undefined at a_t = 0"),
    (dict(z0=torch.zeros(2, 4)), "z0 is for a_t = 0 only"),
    (dict(a_t=0.0, w=0.0, z0=torch.zeros(4)), "z0 must match z_t"),
])
def test_path_step_refuses_bad_inputs(kwargs, message):
    args = dict(z_t=torch.zeros(2, 4), eps=torch.zeros(2, 4), grad=torch.zeros(2, 4),
                a_t=0.6, b_t=0.8, a_prev=0.8, b_prev=0.6, w=1.0) | kwargs
    with pytest.raises(ValueError, match=message):
        ltg.gaussian_path_step(**args)


@pytest.mark.parametrize("fn, value, message", [
    (ltg.vp_coefficients, 1.5, r"abar must lie in \[0, 1\], got 1.5"),
    (ltg.rectified_flow_coefficients, -0.25, r"sigma must lie in \[0, 1\], got -0.25"),
    (ltg.rectified_flow_coefficients, float("nan"), r"sigma must lie in \[0, 1\], got nan"),
])
def test_path_coefficients_refuse_bad_values(fn, value, message):
    with pytest.raises(ValueError, match=message):
        fn(value)


@pytest.mark.skipif(ltg._ltg is None, reason="the _ltg extension is not built")
def test_fused_kernel_refuses_a_t_zero():
    z = torch.zeros(3)
    with pytest.raises(RuntimeError, match="a_t must be finite and > 0"):
        ltg._ltg.gaussian_path_step(z, z, z, 0.0, 1.0, 0.5, 0.5, 0.0, False)


# --- Eqns 11, 8, 7: the fused kernel against the reference, on each path ----------------------

PATHS = {"vp": vp_path(0.2, 0.45), "flow": flow_path(0.6, 0.35), "flow-from-sigma-1": flow_path(1.0, 0.9)}


def check_fused_step_matches_reference(fused_fn, z, eps, grad, w, path=PATHS["vp"]):
    """fused_fn(z, eps, grad, *path, w, return_eps, z0=) against the reference; at a_t = 0 the step
    starts from a clean estimate z0 (here z - eps)."""
    z0 = z - eps if path[0] == 0.0 else None
    z_f, eps_f = fused_fn(z, eps, grad, *path, w, True, z0=z0)
    z_r, eps_r = reference_path_step(z, eps, grad, *path, w, True, z0=z0)
    assert z_f.dtype == z.dtype and eps_f.dtype == z.dtype
    torch.testing.assert_close(z_f, z_r, **tol(z.dtype))
    torch.testing.assert_close(eps_f, eps_r, **tol(z.dtype))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("path", PATHS)
@given(case=step_cases)
def test_fused_step_equals_reference(device, dtype, path, case):
    seed, shape, _, w = case
    z, eps, grad = random_step_inputs(seed, shape, dtype, device)
    check_fused_step_matches_reference(fused_path_step, z, eps, grad, 0.0 if path == "flow-from-sigma-1" else w,
                                       PATHS[path])


@pytest.mark.parametrize("device", DEVICES)
def test_fused_step_handles_non_contiguous_inputs(device):
    z, eps, grad = random_step_inputs(0, (3, 4, 5, 6), torch.float32, device)
    views = [u.permute(0, 2, 3, 1) for u in (z, eps, grad)]
    assert not views[0].is_contiguous()
    check_fused_step_matches_reference(fused_path_step, *views, 0.8)


@pytest.mark.parametrize("fused", [False, True])
def test_fused_step_covers_sizes_around_vector_widths(fused):
    for n in (1, 3, 4, 5, 7, 8, 9, 15, 16, 17, 1023, 4097):
        z, eps, grad = random_step_inputs(n, (n,), torch.float32)
        check_fused_step_matches_reference(lambda *a, **k: ltg.gaussian_path_step(*a, fused=fused, **k),
                                           z, eps, grad, 0.3)


# --- every check above catches a deliberately wrong implementation ---------------------------

def _wrong_signal_variants():
    def no_log_mean(x):  # log pbar without the - log K
        logp = torch.log_softmax(x, -1)
        aleatoric = -(logp.exp() * logp).sum(-1).mean(0)
        logpbar = torch.logsumexp(logp, 0)
        total = -(logpbar.exp() * logpbar).sum(-1)
        return total, aleatoric, total - aleatoric

    def max_instead_of_mean(x):  # aleatoric from the most uncertain member
        total, _, _ = signals(x)
        logp = torch.log_softmax(x, -1)
        aleatoric = -(logp.exp() * logp).sum(-1).amax(0)
        return total, aleatoric, total - aleatoric

    def first_class_weighted(x):  # breaks class-permutation invariance
        return signals(x * torch.linspace(1.0, 1.5, x.shape[-1], dtype=x.dtype))

    return [no_log_mean, max_instead_of_mean, first_class_weighted]


def _wrong_backward(x):
    """Right forward, backward missing its 1/K."""
    total, aleatoric, epistemic = ltg.longtail_signals(x, fused=False)
    K = x.shape[0]
    scale = lambda u: u * K - (u * (K - 1)).detach()  # noqa: E731
    return scale(total), scale(aleatoric), scale(epistemic)


def _wrong_steps():
    def swapped_alphas(z, eps, grad, abar_t, abar_prev, w, return_eps=False):
        return reference_step(z, eps, grad, abar_prev, abar_t, w, return_eps)

    def quadratic_weight(z, eps, grad, abar_t, abar_prev, w, return_eps=False):
        return reference_step(z, eps, grad, abar_t, abar_prev, w * abs(w), return_eps)

    def ignores_weight_in_eps(z, eps, grad, a_t, b_t, a_prev, b_prev, w, return_eps=False, z0=None):
        z_prev = reference_path_step(z, eps, grad, a_t, b_t, a_prev, b_prev, w, z0=z0)
        return (z_prev, eps) if return_eps else z_prev

    def half_precision_math(z, eps, grad, a_t, b_t, a_prev, b_prev, w, return_eps=False, z0=None):
        out = reference_path_step(z.half(), eps.half(), grad.half(), a_t, b_t, a_prev, b_prev, w, return_eps)
        return tuple(u.to(z.dtype) for u in out) if return_eps else out.to(z.dtype)

    return swapped_alphas, quadratic_weight, ignores_weight_in_eps, half_precision_math


def test_checks_catch_wrong_implementations():
    logits = random_logits(11, 4, 3, 6, 3.0)
    no_log_mean, max_instead_of_mean, first_class_weighted = _wrong_signal_variants()
    for check in (lambda f: check_decomposition_and_bounds(f, logits), check_known_values):
        with pytest.raises(AssertionError):
            check(no_log_mean)
    with pytest.raises(AssertionError):
        check_known_values(max_instead_of_mean)
    with pytest.raises(AssertionError):
        check_invariances(first_class_weighted, logits, 0)
    with pytest.raises(AssertionError):
        check_fused_signals_match_reference(_wrong_backward, logits)
    with pytest.raises(AssertionError):
        check_fused_signals_match_reference(first_class_weighted, logits)

    swapped_alphas, quadratic_weight, ignores_weight_in_eps, half_math = _wrong_steps()
    with pytest.raises(AssertionError):
        check_plain_ddim_at_zero_weight(swapped_alphas, 0, (2, 3), 10)
    with pytest.raises(AssertionError):
        check_affine_in_weight(quadratic_weight, 0, (2, 3), 2.5)
    with pytest.raises(AssertionError):
        check_last_step_returns_clean_estimate(swapped_alphas, 0, (2, 3), 1.0)
    z, eps, grad = random_step_inputs(0, (64,), torch.float32)
    with pytest.raises(AssertionError):
        check_fused_step_matches_reference(ignores_weight_in_eps, z, eps, grad, 1.0)
    with pytest.raises(AssertionError):
        check_fused_step_matches_reference(half_math, z, eps, grad, 1.0)


def _wrong_path_steps():
    def reordered_eqn_8(z, eps, grad, a_t, b_t, a_prev, b_prev, w, return_eps=False):  # equal in exact arithmetic
        z_, e, g = (u.to(ltg._compute_dtype(z.dtype)) for u in (z, eps, grad))
        eps_hat = e - w * b_t * g
        return (a_prev * (z_ / a_t - b_t / a_t * eps_hat) + b_prev * eps_hat).to(z.dtype)

    def sign_flipped(z, eps, grad, *args):
        return reference_path_step(z, eps, -grad, *args)

    def bias_without_b_t(z, eps, grad, a_t, b_t, *args):  # eps_hat = eps - w grad
        return reference_path_step(z, eps, grad / b_t, a_t, b_t, *args)

    return reordered_eqn_8, sign_flipped, bias_without_b_t


def test_path_checks_catch_wrong_implementations():
    reordered_eqn_8, sign_flipped, bias_without_b_t = _wrong_path_steps()
    with pytest.raises(AssertionError):
        check_vp_case_is_the_ddim_step(reordered_eqn_8, 0, [64], 0.3, 0.5, 1.5, torch.float32)
    for wrong in (sign_flipped, bias_without_b_t):
        with pytest.raises(AssertionError):
            check_bias_raises_signal_to_first_order(wrong, 0, (2, 2, 3), vp_path(0.5, 0.6))

    swapped_flow_coefficients = euler_step_through_eps(
        reference_path_step, coefficients=lambda sigma: ltg.rectified_flow_coefficients(sigma)[::-1])
    eps_with_sigma_for_a = euler_step_through_eps(reference_path_step,
                                                  to_eps=lambda z, u, sigma: z + float(sigma) * u)
    first_step_from_z = euler_step_through_eps(reference_path_step, to_clean=lambda z, u, sigma: z)
    for wrong, index in ((swapped_flow_coefficients, 0), (swapped_flow_coefficients, 3), (eps_with_sigma_for_a, 3),
                         (first_step_from_z, 0)):
        with pytest.raises(AssertionError):
            check_flow_step_is_the_diffusers_euler_step(wrong, 0, (2, 3), 10, index, 3.0)

    swapped_v = v_step_through_eps(reference_path_step, to_eps=lambda z, v, a_t, b_t: b_t * v + a_t * z)
    with pytest.raises(AssertionError):
        check_v_step_is_the_diffusers_ddim_step(swapped_v, 0, (2, 3), 10)
