"""Property tests of the guidance math: Eqn 4 (the longtail signal) and Eqns 11, 8, 7 (the guided
DDIM update), for the pure-torch reference and the fused kernels.

Each property is a `check_*` function used twice: on the real implementation, where it must hold,
and on a deliberately wrong one (test_checks_catch_wrong_implementations), where it must fail.
"""

import math

import pytest
import torch
from diffusers import DDIMScheduler
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


def toy_longtail_signal(z0):
    """f_lt(D(z0)) for a fixed linear decoder D and a fixed 3-member linear epistemic head."""
    g = torch.Generator().manual_seed(0)
    decoder = torch.randn(z0[0].numel(), 6, generator=g, dtype=z0.dtype) / z0[0].numel() ** 0.5
    heads = torch.randn(3, 6, 4, generator=g, dtype=z0.dtype) / 6 ** 0.5
    x = z0.flatten(1) @ decoder                                            # [B, 6]
    return ltg.longtail_signal(torch.einsum("bd,kdc->kbc", x, heads), "total", fused=False)


def check_guidance_raises_signal(step_fn, seed, shape):
    """One guided step moves the clean estimate up the signal: Eqn 11's sign is right."""
    z, eps, _ = random_step_inputs(seed, shape)
    abar_t, abar_prev, w = 0.5, 0.6, 1e-3
    z = z.requires_grad_()
    signal = toy_longtail_signal(ltg.predict_clean_latent(z, eps, abar_t))  # eps held constant
    grad, = torch.autograd.grad(signal.sum(), z)
    z = z.detach()
    guided = ltg.predict_clean_latent(z, step_fn(z, eps, grad, abar_t, abar_prev, w, True)[1], abar_t)
    assert (toy_longtail_signal(guided) > signal.detach()).all(), "guidance lowered the signal"


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


@pytest.mark.parametrize("step_fn", [reference_step, fused_step], ids=["reference", "fused"])
@given(seed=st.integers(0, 2**31 - 1), batch=st.integers(1, 4))
def test_guidance_raises_the_signal(step_fn, seed, batch):
    check_guidance_raises_signal(step_fn, seed, (batch, 2, 3))


def test_plain_ddim_over_a_whole_trajectory():
    """w = 0 run for all 50 steps on a toy noise model stays on diffusers' DDIM trajectory."""
    scheduler = sd14_scheduler()
    z = ours = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    for t in scheduler.timesteps:
        model = lambda x: 0.5 * torch.tanh(x) + 0.1 * t / 1000  # noqa: E731
        z = scheduler.step(model(z), t, z, eta=0.0).prev_sample
        ours = ltg.guided_ddim_step(ours, model(ours), torch.zeros_like(ours), *ltg.ddim_alphas(scheduler, t), 0.0)
    torch.testing.assert_close(ours, z, rtol=1e-5, atol=1e-5)


def check_fused_step_matches_reference(fused_fn, z, eps, grad, w):
    abar_t, abar_prev = 0.2, 0.45
    z_f, eps_f = fused_fn(z, eps, grad, abar_t, abar_prev, w, True)
    z_r, eps_r = ltg.guided_ddim_step(z, eps, grad, abar_t, abar_prev, w, True, fused=False)
    assert z_f.dtype == z.dtype and eps_f.dtype == z.dtype
    torch.testing.assert_close(z_f, z_r, **tol(z.dtype))
    torch.testing.assert_close(eps_f, eps_r, **tol(z.dtype))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@given(case=step_cases)
def test_fused_step_equals_reference(device, dtype, case):
    seed, shape, _, w = case
    z, eps, grad = random_step_inputs(seed, shape, dtype, device)
    check_fused_step_matches_reference(fused_step, z, eps, grad, w)


@pytest.mark.parametrize("device", DEVICES)
def test_fused_step_handles_non_contiguous_inputs(device):
    z, eps, grad = random_step_inputs(0, (3, 4, 5, 6), torch.float32, device)
    views = [u.permute(0, 2, 3, 1) for u in (z, eps, grad)]
    assert not views[0].is_contiguous()
    check_fused_step_matches_reference(fused_step, *views, 0.8)


@pytest.mark.parametrize("fused", [False, True])
def test_fused_step_covers_sizes_around_vector_widths(fused):
    for n in (1, 3, 4, 5, 7, 8, 9, 15, 16, 17, 1023, 4097):
        z, eps, grad = random_step_inputs(n, (n,), torch.float32)
        check_fused_step_matches_reference(lambda *a: ltg.guided_ddim_step(*a, fused=fused), z, eps, grad, 0.3)


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
    def sign_flipped(z, eps, grad, abar_t, abar_prev, w, return_eps=False):
        return reference_step(z, eps, -grad, abar_t, abar_prev, w, return_eps)

    def swapped_alphas(z, eps, grad, abar_t, abar_prev, w, return_eps=False):
        return reference_step(z, eps, grad, abar_prev, abar_t, w, return_eps)

    def quadratic_weight(z, eps, grad, abar_t, abar_prev, w, return_eps=False):
        return reference_step(z, eps, grad, abar_t, abar_prev, w * abs(w), return_eps)

    def ignores_weight_in_eps(z, eps, grad, abar_t, abar_prev, w, return_eps=False):
        z_prev = reference_step(z, eps, grad, abar_t, abar_prev, w)
        return (z_prev, eps) if return_eps else z_prev

    def half_precision_math(z, eps, grad, abar_t, abar_prev, w, return_eps=False):
        out = reference_step(z.half(), eps.half(), grad.half(), abar_t, abar_prev, w, return_eps)
        return tuple(u.to(z.dtype) for u in out) if return_eps else out.to(z.dtype)

    return sign_flipped, swapped_alphas, quadratic_weight, ignores_weight_in_eps, half_precision_math


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

    sign_flipped, swapped_alphas, quadratic_weight, ignores_weight_in_eps, half_math = _wrong_steps()
    with pytest.raises(AssertionError):
        check_guidance_raises_signal(sign_flipped, 0, (2, 2, 3))
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
