"""Longtail Guidance (Hayden et al., "Generative Data Mining with Longtail-Guided Diffusion", ICML 2025).

A predictor f flags what it finds rare or hard through a longtail signal: the uncertainty of an
Epistemic Head on its stop-gradient features (Eqn 4). Longtail Guidance (Algorithm 1) steers a
latent diffusion model towards images that raise that signal:

    z_T ~ N(0, I)
    for t = T-1 ... 0:
        zhat0   = (z_t - sqrt(1 - abar_t) * eps) / sqrt(abar_t)          # Eqn 8
        xhat0   = D(zhat0)                                               # decode the clean estimate
        s       = f_lt(xhat0)                                            # Eqn 4, the longtail signal
        eps_hat = eps - w * sqrt(1 - abar_t) * grad_{z_t} s              # Eqn 11
        z_{t-1} = sqrt(abar_{t-1}) * zhat0' + sqrt(1 - abar_{t-1}) * eps_hat   # Eqn 7 (DDIM, eta = 0)
    return D(z_0)

The same equations hold on any Gaussian path z_t = a_t x0 + b_t eps, with (sqrt(abar_t), sqrt(1 - abar_t))
replaced by (a_t, b_t): variance preserving (SD 1.x, 2.x, SDXL) is the case above, rectified flow
(SD 3.x, FLUX) has (a_t, b_t) = (1 - sigma_t, sigma_t), and there Eqn 7 is the Euler step. The model's
output is converted to eps first (v-prediction, flow velocity); rectified flow's first step, at
sigma = 1 where a_t = 0, is taken unguided from the clean estimate (see gaussian_path_step).

This file holds the math in order: the longtail signal (Eqn 4), the guided update (Eqns 11, 8, 7), the
Epistemic Head, and Algorithm 1 over any Denoiser; families.py adapts each diffusers family to that interface.
Each op has a pure-torch reference and a fused kernel from the `_ltg` extension (csrc/); the
reference is the definition, the kernel must agree with it.
"""

import contextlib
import math
import warnings
from dataclasses import dataclass, field
from typing import Protocol

import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler, FlowMatchEulerDiscreteScheduler
from torch import nn
from tqdm.auto import tqdm

from families import ClassConditionalDenoiser, denoiser_for, family_defaults, load_pipeline  # noqa: F401 (ltg.load_pipeline)

try:
    import _ltg
except ImportError:  # the extension is optional: every op has a pure-torch reference
    _ltg = None

_warned_reference = False


def backend(device="cpu"):
    """Which implementation the ops use for tensors on `device`: 'fused' or 'reference'."""
    if _ltg is None:
        return "reference"
    if torch.device(device).type == "cuda":
        return "fused" if _ltg.has_cuda() else "reference"
    return "fused"


def _use_fused(fused, device):
    global _warned_reference
    available = backend(device) == "fused"
    if fused is None:
        if not available and not _warned_reference:
            warnings.warn(f"ltg: fused kernels unavailable for {device}; using the pure-torch reference "
                          "(build them with `pip install --no-build-isolation -e .`)", stacklevel=3)
            _warned_reference = True
        return available
    if fused and not available:
        raise RuntimeError(f"ltg: fused kernels requested but not built for device {device}")
    return fused


def _compute_dtype(dtype):
    """Half and bfloat16 are computed in float32; float64 stays float64."""
    return torch.float64 if dtype == torch.float64 else torch.float32


# ---------------------------------------------------------------------------------------------
# Eqn 4: the longtail signal. K predictions per input from one forward pass of the Epistemic Head.
#   p_k = softmax(logits_k),  pbar = mean_k p_k
#   total U = H[pbar],  aleatoric A = mean_k H[p_k],  epistemic E = U - A  (>= 0 by Jensen)
# ---------------------------------------------------------------------------------------------

SIGNALS = ("total", "epistemic", "aleatoric")


def longtail_signals_reference(logits):
    """Eqn 4 in pure torch. logits [K, B, C] -> (total, aleatoric, epistemic), each [B]."""
    K = logits.shape[0]
    x = logits.to(_compute_dtype(logits.dtype))
    logp = torch.log_softmax(x, dim=-1)                               # [K, B, C]
    aleatoric = -(logp.exp() * logp).sum(-1).mean(0)                  # mean_k H[p_k], [B]
    logpbar = torch.logsumexp(logp, dim=0) - math.log(K)              # log mean_k p_k, [B, C]
    total = -(logpbar.exp() * logpbar).sum(-1)                        # H[pbar], [B]
    epistemic = total - aleatoric
    return tuple(u.to(logits.dtype) for u in (total, aleatoric, epistemic))


class _FusedLongtailSignals(torch.autograd.Function):
    """Eqn 4 with the fused kernel: one forward pass, and a fused backward that uses
    dU/dx_kj = -p_kj (log pbar_j - sum_c p_kc log pbar_c) / K and
    dA/dx_kj = -p_kj (log p_kj + H[p_k]) / K."""

    @staticmethod
    def forward(ctx, logits):
        total, aleatoric, epistemic, lse, logpbar = _ltg.entropy_forward(logits)
        ctx.save_for_backward(logits, lse, logpbar)
        return total, aleatoric, epistemic

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_total, grad_aleatoric, grad_epistemic):
        logits, lse, logpbar = ctx.saved_tensors
        return _ltg.entropy_backward(grad_total.contiguous(), grad_aleatoric.contiguous(),
                                     grad_epistemic.contiguous(), logits, lse, logpbar)


def _check_logits(logits):
    if logits.dim() != 3:
        raise ValueError(f"ltg: logits must have shape [K, B, C], got {tuple(logits.shape)}")
    if logits.dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        raise TypeError(f"ltg: logits must be a floating tensor (float16, bfloat16, float32, float64), "
                        f"got {logits.dtype}")
    if min(logits.shape) == 0:
        raise ValueError(f"ltg: logits must be non-empty, got shape {tuple(logits.shape)}")


def longtail_signals(logits, fused=None):
    """Eqn 4. logits [K, B, C] -> (total, aleatoric, epistemic), each [B], differentiable.

    fused=None takes the fused kernel when it is built for the tensor's device, else the reference.
    """
    _check_logits(logits)
    if _use_fused(fused, logits.device):
        return _FusedLongtailSignals.apply(logits.contiguous())
    return longtail_signals_reference(logits)


def longtail_signals_by_kind(logits, fused=None):
    """Eqn 4 keyed by kind: logits [K, B, C] -> {'total', 'epistemic', 'aleatoric': [B]}."""
    total, aleatoric, epistemic = longtail_signals(logits, fused)
    return {"total": total, "epistemic": epistemic, "aleatoric": aleatoric}


def longtail_signal(logits, kind="total", fused=None):
    """The guidance signal f_lt: one of 'total' (default, as in the paper), 'epistemic', 'aleatoric'."""
    if kind not in SIGNALS:
        raise ValueError(f"ltg: unknown signal {kind!r}; choose one of {', '.join(SIGNALS)}")
    return longtail_signals_by_kind(logits, fused)[kind]


# ---------------------------------------------------------------------------------------------
# Eqns 8, 11, 7: the guided update on the Gaussian path z_t = a_t x0 + b_t eps that every family
# writes its noisy latent on. The model's output is converted to eps first; grad = grad_{z_t} f_lt(D(zhat0)).
#   Eqn 8:  zhat0   = (z_t - b_t eps) / a_t
#   Eqn 11: eps_hat = eps - w b_t grad
#   Eqn 7:  z_prev  = a_prev zhat0(eps_hat) + b_prev eps_hat        (DDIM with eta = 0; Euler for rectified flow)
# "eps held constant" means the converted eps in every family (for a velocity model z_t + a_t u, not u), so
# grad_{z_t} = grad_{zhat0} / a_t: the guidance depends on the denoiser, not on how its network writes it.
# At a_t = 0 (rectified flow's sigma = 1) z_t = b_t eps holds nothing of x0: Eqn 8 divides by zero, and
# any bias delta of eps moves zhat0 by (b_t / a_t) delta, so Eqn 11 has no finite form there. That step
# is unguided, taken from the clean estimate in a finite form (z_t - sigma_t u, Eqn 8 for a velocity model).
# ---------------------------------------------------------------------------------------------

def vp_coefficients(abar):
    """(a, b) = (sqrt(abar), sqrt(1 - abar)) of the variance-preserving path (SD 1.x, 2.x, SDXL)."""
    abar = float(abar)
    if not 0.0 <= abar <= 1.0:
        raise ValueError(f"ltg: abar must lie in [0, 1], got {abar}")
    return math.sqrt(abar), math.sqrt(1.0 - abar)


def rectified_flow_coefficients(sigma):
    """(a, b) = (1 - sigma, sigma) of the rectified-flow path (SD 3.x, FLUX)."""
    sigma = float(sigma)
    if not 0.0 <= sigma <= 1.0:
        raise ValueError(f"ltg: sigma must lie in [0, 1], got {sigma}")
    return 1.0 - sigma, sigma


def epsilon_from_v(z_t, v, a_t, b_t):
    """eps of a v-prediction (SD 2.x 768-v) on the VP path, v = a_t eps - b_t x0: eps = a_t v + b_t z_t."""
    return a_t * v + b_t * z_t


def epsilon_from_velocity(z_t, u, sigma):
    """eps of a rectified-flow velocity (SD 3.x, FLUX), u = eps - x0: eps = z_t + (1 - sigma) u."""
    return z_t + (1.0 - float(sigma)) * u


def clean_latent(z_t, eps, a_t, b_t):
    """Eqn 8 on any path (a_t > 0): zhat0 = (z_t - b_t eps) / a_t."""
    return (z_t - b_t * eps) / a_t


def clean_latent_from_velocity(z_t, u, sigma):
    """Eqn 8 for a rectified-flow velocity, finite at sigma = 1 too: zhat0 = z_t - sigma u."""
    return z_t - float(sigma) * u


def predict_clean_latent(z_t, eps, abar_t):
    """Eqn 8 on the VP path: zhat0 = (z_t - sqrt(1 - abar_t) * eps) / sqrt(abar_t)."""
    return clean_latent(z_t, eps, *vp_coefficients(abar_t))


PREDICTIONS = ("epsilon", "v_prediction", "flow")


def epsilon_and_clean_latent(z_t, output, prediction, a_t, b_t):
    """The network's output -> (eps, zhat0) at (a_t, b_t), each in a form that is finite wherever the
    parametrisation allows (Eqn 8 for eps-prediction divides by a_t; v and velocity do not).
      epsilon:       eps as is,             zhat0 = (z_t - b_t eps) / a_t
      v_prediction:  eps = a_t v + b_t z_t, zhat0 = a_t z_t - b_t v      (VP, a^2 + b^2 = 1)
      flow:          eps = z_t + a_t u,     zhat0 = z_t - b_t u          (rectified flow, a + b = 1)"""
    if prediction == "epsilon":
        if a_t == 0:
            raise ValueError("ltg: an epsilon-predicting model says nothing of x0 at a_t = 0 (zero terminal SNR): "
                             "take a v-prediction model or a schedule with abar_T > 0")
        return output, clean_latent(z_t, output, a_t, b_t)
    if prediction == "v_prediction":
        return epsilon_from_v(z_t, output, a_t, b_t), a_t * z_t - b_t * output
    if prediction == "flow":
        return epsilon_from_velocity(z_t, output, b_t), clean_latent_from_velocity(z_t, output, b_t)
    raise ValueError(f"ltg: unknown prediction type {prediction!r}; supported: {', '.join(PREDICTIONS)}")


@dataclass(frozen=True)
class PathStep:
    """One step of a sampler on the path: the network's timestep t, (a_t, b_t) and (a_prev, b_prev)."""
    t: torch.Tensor
    a_t: float
    b_t: float
    a_prev: float
    b_prev: float


def ddim_alphas(scheduler, t):
    """(abar_t, abar_prev) for DDIM timestep t of a diffusers DDIMScheduler, read as its step() reads them."""
    prev_t = int(t) - scheduler.config.num_train_timesteps // scheduler.num_inference_steps
    abar_prev = scheduler.alphas_cumprod[prev_t] if prev_t >= 0 else scheduler.final_alpha_cumprod
    return float(scheduler.alphas_cumprod[int(t)]), float(abar_prev)


def path_steps(scheduler):
    """A scheduler's timesteps (after set_timesteps) as PathSteps, noisiest first: a DDIMScheduler's on the VP
    path, a FlowMatchEulerDiscreteScheduler's (sigma_i -> sigma_i+1) on the rectified-flow path."""
    if isinstance(scheduler, DDIMScheduler):
        alphas = [ddim_alphas(scheduler, t) for t in scheduler.timesteps]
        return [PathStep(t, *vp_coefficients(abar_t), *vp_coefficients(abar_prev))
                for t, (abar_t, abar_prev) in zip(scheduler.timesteps, alphas)]
    sigmas = scheduler.sigmas.tolist()
    return [PathStep(t, *rectified_flow_coefficients(sigmas[i]), *rectified_flow_coefficients(sigmas[i + 1]))
            for i, t in enumerate(scheduler.timesteps)]


def gaussian_path_step_reference(z_t, eps, grad, a_t, b_t, a_prev, b_prev, w, return_eps=False):
    """Eqns 11, 8, 7 in pure torch (a_t > 0): z_prev (and eps_hat if return_eps), same shape and dtype as z_t."""
    z, e, g = (u.to(_compute_dtype(z_t.dtype)) for u in (z_t, eps, grad))
    eps_hat = e - w * b_t * g                                          # Eqn 11
    z0_hat = clean_latent(z, eps_hat, a_t, b_t)                        # Eqn 8, from eps_hat
    z_prev = a_prev * z0_hat + b_prev * eps_hat                        # Eqn 7
    return (z_prev.to(z_t.dtype), eps_hat.to(z_t.dtype)) if return_eps else z_prev.to(z_t.dtype)


def _check_step_inputs(z_t, eps, grad, z0, a_t, b_t, a_prev, b_prev, w):
    for name, u in (("eps", eps), ("grad", grad), ("z0", z0)):
        if u is not None and (u.shape != z_t.shape or u.dtype != z_t.dtype or u.device != z_t.device):
            raise ValueError(f"ltg: {name} must match z_t in shape, dtype and device; got "
                             f"{tuple(u.shape)} {u.dtype} {u.device} vs {tuple(z_t.shape)} {z_t.dtype} {z_t.device}")
    if z_t.dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        raise TypeError(f"ltg: z_t must be float16, bfloat16, float32 or float64, got {z_t.dtype}")
    for name, c in (("a_t", a_t), ("b_t", b_t), ("a_prev", a_prev), ("b_prev", b_prev)):
        if not (math.isfinite(c) and c >= 0.0):
            raise ValueError(f"ltg: path coefficient {name} must be finite and >= 0, got {c}")
    if not math.isfinite(w):
        raise ValueError(f"ltg: guidance weight w must be finite, got {w}")
    if a_t == 0.0 and z0 is None:
        raise ValueError("ltg: at a_t = 0 (sigma = 1) Eqn 8 has no finite form in eps: pass the clean estimate z0 "
                         "(e.g. clean_latent_from_velocity)")
    if a_t == 0.0 and w != 0.0:
        raise ValueError(f"ltg: guidance is undefined at a_t = 0 (sigma = 1): take that step with w = 0, got {w}")
    if a_t > 0.0 and z0 is not None:
        raise ValueError(f"ltg: z0 is for a_t = 0 only; at a_t = {a_t} Eqn 8 computes it from z_t and eps_hat")


def gaussian_path_step(z_t, eps, grad, a_t, b_t, a_prev, b_prev, w, return_eps=False, fused=None, z0=None):
    """Eqns 11 + 8 + 7 in one pass on the path z_t = a_t x0 + b_t eps: (z_t, eps, grad) of any one shape
    -> z_prev (, eps_hat).

    (a_t, b_t), (a_prev, b_prev): the path's coefficients at this step and at the next, less noisy one
    (vp_coefficients, rectified_flow_coefficients); eps: the model's output converted to eps; w: the
    guidance weight (w = 0 is the plain DDIM step, the Euler step for rectified flow). Arithmetic is
    float32 for half types.

    At a_t = 0 pass z0, the clean estimate from the model's output (clean_latent_from_velocity), and
    w = 0: the step is a_prev z0 + b_prev eps. That is this same update taken from the clean point of
    the path, (a, b) = (1, 0), where z = z0.
    """
    a_t, b_t, a_prev, b_prev, w = (float(c) for c in (a_t, b_t, a_prev, b_prev, w))
    _check_step_inputs(z_t, eps, grad, z0, a_t, b_t, a_prev, b_prev, w)
    if a_t == 0.0:
        z_t, a_t, b_t = z0, 1.0, 0.0
    if _use_fused(fused, z_t.device):
        z_prev, eps_hat = _ltg.gaussian_path_step(z_t.contiguous(), eps.contiguous(), grad.contiguous(),
                                                  a_t, b_t, a_prev, b_prev, w, return_eps)
        return (z_prev, eps_hat) if return_eps else z_prev
    return gaussian_path_step_reference(z_t, eps, grad, a_t, b_t, a_prev, b_prev, w, return_eps)


def guided_ddim_step(z_t, eps, grad, abar_t, abar_prev, w, return_eps=False, fused=None):
    """Eqns 11 + 8 + 7 on the variance-preserving path, the paper's guided DDIM step (eta = 0):
    gaussian_path_step with (a, b) = vp_coefficients(abar).

    abar_t, abar_prev: the cumulative alpha products at t and at the previous (less noisy) step;
    w: the guidance weight (w = 0 is plain DDIM).
    """
    abar_t, abar_prev = float(abar_t), float(abar_prev)
    for name, abar in (("abar_t", abar_t), ("abar_prev", abar_prev)):
        if not 0.0 < abar <= 1.0:
            raise ValueError(f"ltg: {name} must lie in (0, 1], got {abar}")
    return gaussian_path_step(z_t, eps, grad, *vp_coefficients(abar_t), *vp_coefficients(abar_prev), w,
                              return_eps, fused)


# ---------------------------------------------------------------------------------------------
# The Epistemic Head: K predictions per input in one forward pass, on the predictor's
# stop-gradient penultimate features h = sg(phi(x)). Epinet (Osband et al.):
#   logits_k = mu(x) + sigma_L(h, z_k) + prior_scale * sigma_P(h, z_k),   z_k ~ N(0, I_D)
# or a deep ensemble of K linear heads on h. Either way the predictor's own outputs mu(x) and its
# parameters are untouched: the head's loss sees only detached (h, mu).
# ---------------------------------------------------------------------------------------------

HEADS = ("epinet", "ensemble")


def last_linear(model):
    """The classifier's final nn.Linear (resnet.fc, classifier[-1], heads.head, ...): its input is h."""
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError(f"ltg: {type(model).__name__} has no nn.Linear layer to read penultimate features from")
    return linears[-1]


class IndexMLP(nn.Module):
    """sigma(h, z) = g([h, z])^T z: an MLP of features and an epistemic index, contracted with the index."""

    def __init__(self, features, index_dim, classes, hidden):
        super().__init__()
        self.classes, self.index_dim = classes, index_dim
        self.mlp = nn.Sequential(nn.Linear(features + index_dim, hidden), nn.ReLU(),
                                 nn.Linear(hidden, classes * index_dim))

    def forward(self, h, z):                                                     # h [B, F], z [K, D]
        K, B = z.shape[0], h.shape[0]
        hz = torch.cat([h.expand(K, B, -1), z[:, None].expand(K, B, -1)], dim=-1)  # [K, B, F + D]
        g = self.mlp(hz).view(K, B, self.classes, self.index_dim)                 # [K, B, C, D]
        return torch.einsum("kbcd,kd->kbc", g, z)                                 # [K, B, C]


class EpistemicHead(nn.Module):
    """Wraps a classifier f (any torchvision classifier) and gives K logits per input: [K, B, C].

    head(x) is differentiable in x (for guidance); head.loss(h, mu, y) trains the head alone.
    In eval mode the K epistemic indices are fixed (the signal is a function of x); in train mode
    they are drawn afresh each call.
    """

    def __init__(self, predictor, num_samples=16, kind="epinet", index_dim=8, hidden=50, prior_scale=1.0,
                 seed=0):
        super().__init__()
        if kind not in HEADS:
            raise ValueError(f"ltg: unknown head {kind!r}; choose one of {', '.join(HEADS)}")
        if num_samples < 1:
            raise ValueError(f"ltg: num_samples (K) must be >= 1, got {num_samples}")
        self.predictor, self.kind, self.prior_scale = predictor, kind, prior_scale
        fc = last_linear(predictor)
        features, classes = fc.in_features, fc.out_features
        g = torch.Generator().manual_seed(seed)
        if kind == "epinet":
            self.register_buffer("indices", torch.randn(num_samples, index_dim, generator=g))  # [K, D]
            self.learnable = IndexMLP(features, index_dim, classes, hidden)
            self.prior = IndexMLP(features, index_dim, classes, hidden).requires_grad_(False)
        else:
            bound = 1 / math.sqrt(features)
            self.weight = nn.Parameter((torch.rand(num_samples, features, classes, generator=g) * 2 - 1) * bound)
            self.bias = nn.Parameter((torch.rand(num_samples, classes, generator=g) * 2 - 1) * bound)

    @property
    def num_samples(self):
        return (self.indices if self.kind == "epinet" else self.weight).shape[0]

    def features_and_logits(self, x):
        """One forward pass of the predictor: penultimate features h [B, F] and its logits mu [B, C]."""
        captured = {}
        hook = last_linear(self.predictor).register_forward_hook(lambda m, inputs, out: captured.update(h=inputs[0]))
        try:
            mu = self.predictor(x)
        finally:
            hook.remove()
        return captured["h"], mu

    def head_logits(self, h, mu):                                                # -> [K, B, C]
        if self.kind == "ensemble":
            return torch.einsum("bf,kfc->kbc", h, self.weight) + self.bias[:, None]
        z = torch.randn_like(self.indices) if self.training else self.indices
        return mu + self.learnable(h, z) + self.prior_scale * self.prior(h, z)

    def forward(self, x):
        return self.head_logits(*self.features_and_logits(x))

    def loss(self, h, mu, y):
        """Cross entropy averaged over the K members, on stop-gradient (h, mu): reaches the head only.
        y: labels [B], or class probabilities [B, C] (label smoothing, mixup)."""
        logits = self.head_logits(h.detach(), mu.detach())                       # [K, B, C]
        return F.cross_entropy(logits.flatten(0, 1), y.repeat(logits.shape[0], *[1] * (y.dim() - 1)))


# ---------------------------------------------------------------------------------------------
# Denoisers: what Algorithm 1 needs of a diffusion model. families.py adapts each diffusers family
# (SD 1.x/2.x, SDXL, SD 3.x, FLUX, and the pixel-space digits model) to this one interface.
# ---------------------------------------------------------------------------------------------

class Denoiser(Protocol):
    """A diffusion model as Algorithm 1 uses it.

    scheduler: a DDIMScheduler (variance-preserving path) or a FlowMatchEulerDiscreteScheduler (rectified
        flow); path_steps reads its timesteps and coefficients.
    prediction: what predict returns, one of PREDICTIONS ('flow' is the velocity eps - x0).
    """
    scheduler: object
    prediction: str

    def set_timesteps(self, num_inference_steps: int, device) -> None:
        """Sets the scheduler's N steps as the family's pipeline sets them (shifts included)."""

    def initial_latent(self, generators: list, device) -> torch.Tensor:
        """z_T [B, ...] in float32, one generator per image, drawn as the family's pipeline draws it."""

    def predict(self, z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The network's output at (z_t, t) with its own guidance (classifier-free, distilled) applied, in z's dtype."""

    def decode(self, z0: torch.Tensor) -> torch.Tensor:
        """D(z0): images [B, 3, H, W] in [-1, 1]."""

    def guidance_decode(self, z0: torch.Tensor) -> torch.Tensor:
        """D for the guidance pass: the same, or a cheaper decoder of the same latents."""


def check_scheduler(scheduler, prediction):
    """Algorithm 1 takes deterministic steps on a Gaussian path: DDIM (eta = 0, no x0 clipping) on the VP
    path, the Euler step of a FlowMatchEulerDiscreteScheduler on the rectified-flow path."""
    config = scheduler.config
    if isinstance(scheduler, DDIMScheduler):
        if prediction not in ("epsilon", "v_prediction") or config.prediction_type != prediction:
            raise ValueError(f"ltg: a DDIMScheduler needs an epsilon- or v-predicting model matching its "
                             f"prediction_type; got {prediction!r} and prediction_type={config.prediction_type!r}")
        if config.clip_sample or config.thresholding:
            raise ValueError(f"ltg: the DDIMScheduler must not clip or threshold x0; got clip_sample="
                             f"{config.clip_sample}, thresholding={config.thresholding}")
    elif isinstance(scheduler, FlowMatchEulerDiscreteScheduler):
        if prediction != "flow" or config.stochastic_sampling or config.invert_sigmas:
            raise ValueError(f"ltg: a FlowMatchEulerDiscreteScheduler needs a velocity ('flow') model and "
                             f"deterministic, uninverted sigmas; got {prediction!r}, stochastic_sampling="
                             f"{config.stochastic_sampling}, invert_sigmas={config.invert_sigmas}")
    else:
        raise ValueError(f"ltg: Algorithm 1 needs a DDIMScheduler or a FlowMatchEulerDiscreteScheduler, got "
                         f"{type(scheduler).__name__} (ltg.load_pipeline sets the right one)")


# ---------------------------------------------------------------------------------------------
# Algorithm 1: Longtail Guidance over DDIM.
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Guidance:
    """How Algorithm 1 guides. w = 0 is plain DDIM. Steps i (0 = noisiest) with
    start <= i / N < end and i % every == 0 are guided. rescale: the gradient is scaled per sample
    so that ||b_t grad|| = ||eps|| (rescale_gradient), making w the guidance term's share of eps's norm."""
    w: float = 0.0
    signal: str = "total"
    start: float = 0.0
    end: float = 1.0
    every: int = 1
    through_unet: bool = False
    rescale: bool = False

    def __post_init__(self):
        if not (math.isfinite(self.w) and self.w >= 0):
            raise ValueError(f"ltg: guidance weight w must be finite and >= 0 (0 is plain DDIM), got {self.w}")
        if self.signal not in SIGNALS:
            raise ValueError(f"ltg: unknown signal {self.signal!r}; choose one of {', '.join(SIGNALS)}")
        if not 0.0 <= self.start < self.end <= 1.0:
            raise ValueError(f"ltg: guidance window needs 0 <= start < end <= 1, got [{self.start}, {self.end})")
        if self.every < 1:
            raise ValueError(f"ltg: guidance every must be >= 1, got {self.every}")

    def guides(self, i, num_steps):
        return self.w > 0 and self.start <= i / num_steps < self.end and i % self.every == 0


@dataclass
class LTGOutput:
    images: torch.Tensor          # [B, C, H, W] in [0, 1]
    signal: torch.Tensor          # [B] the longtail signal of each final image, the guided kind
    signals: dict                 # 'total', 'epistemic', 'aleatoric' -> [B]: every kind, of each final image
    label: torch.Tensor           # [B] the predictor's label of each final image
    skipped: torch.Tensor         # [B] guidance steps skipped for a non-finite gradient
    guidance_ratio: list = field(default_factory=list)  # per guided step: mean ||w b_t grad|| / ||eps||


IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def predictor_preprocess(size=224, mean=IMAGENET_MEAN, std=IMAGENET_STD):
    """Images [B, 3, H, W] in [0, 1] -> a torchvision classifier's input [B, 3, size, size] in float32:
    antialiased bilinear resize (in float32: the CPU kernel has no bfloat16), then normalisation;
    differentiable. mean and std are copied to each input's device once, not per call."""
    stats = {}

    def preprocess(x):
        if x.device not in stats:
            stats[x.device] = [torch.tensor(v, dtype=torch.float32, device=x.device).view(1, -1, 1, 1)
                               for v in (mean, std)]
        m, s = stats[x.device]
        return (F.interpolate(x.float(), size=(size, size), mode="bilinear", antialias=True) - m) / s

    return preprocess


def head_input(head, preprocess, images):
    """Images in [0, 1] -> preprocess(images) in the head's parameter dtype."""
    return preprocess(images).to(next(head.parameters()).dtype)


def image_signal(head, preprocess, kind):
    """f_lt on decoded images x in [-1, 1]: the predictor sees preprocess((x + 1) / 2)."""
    return lambda x: longtail_signal(head(head_input(head, preprocess, (x + 1) / 2)), kind)


def longtail_gradient(denoiser, signal_fn, z, step, through_unet):
    """eps and grad_{z_t} f_lt(D(zhat0)) [B, ...] at a PathStep with a_t > 0. With eps held constant (default),
    grad_{z_t} = grad_{zhat0} / a_t; through_unet backpropagates through the network too."""
    convert = lambda z, out: epsilon_and_clean_latent(z, out, denoiser.prediction, step.a_t, step.b_t)  # noqa: E731
    with torch.enable_grad():
        if through_unet:
            z = z.detach().requires_grad_()
            eps, zhat0 = convert(z, denoiser.predict(z, step.t))                             # Eqn 8
            grad, = torch.autograd.grad(signal_fn(denoiser.guidance_decode(zhat0)).sum(), z)
            return eps.detach(), grad
        with torch.no_grad():
            eps, zhat0 = convert(z, denoiser.predict(z, step.t))                             # Eqn 8
        zhat0.requires_grad_()
        grad, = torch.autograd.grad(signal_fn(denoiser.guidance_decode(zhat0)).sum(), zhat0)
        return eps, grad / step.a_t


def _per_sample_norm(u):
    return u.flatten(1).float().norm(dim=1).view(-1, *[1] * (u.dim() - 1))


def rescale_gradient(grad, eps, b_t):
    """grad [B, ...] scaled per sample so that ||b_t grad|| = ||eps||: w is then the guidance term's share
    of the noise estimate's norm in Eqn 11, on any path (eps is the model's output converted to eps)."""
    return grad * _per_sample_norm(eps) / (b_t * _per_sample_norm(grad) + 1e-12)


def sample_longtail_ddim(denoiser, z, signal_fn, guidance, autocast=None, progress=True):
    """Algorithm 1 from z_T [B, ...] to z_0 over the denoiser's scheduler's steps (set_timesteps done); returns
    (z_0, skipped [B], guidance ratios). A step at a_t = 0 (rectified flow's sigma = 1) is never guided.
    The bookkeeping stays on z's device and is read once at the end: no host sync inside the loop."""
    skipped = torch.zeros(z.shape[0], dtype=torch.long, device=z.device)
    ratios = []
    steps = path_steps(denoiser.scheduler)
    amp = torch.autocast(z.device.type, dtype=autocast) if autocast else contextlib.nullcontext()
    for i, step in enumerate(tqdm(steps, desc="LTG sampling", disable=not progress, leave=False)):
        z0, w = None, guidance.w
        if guidance.guides(i, len(steps)) and step.a_t > 0:
            with amp:
                eps, grad = longtail_gradient(denoiser, signal_fn, z, step, guidance.through_unet)
            eps, grad = eps.to(z.dtype), grad.to(z.dtype)
            finite = torch.isfinite(grad).flatten(1).all(dim=1)                   # [B]
            skipped += ~finite
            grad = torch.where(finite.view(-1, *[1] * (z.dim() - 1)), grad, 0.0)
            if guidance.rescale:
                grad = rescale_gradient(grad, eps, step.b_t)
            term = guidance.w * step.b_t * _per_sample_norm(grad)
            ratios.append((term / _per_sample_norm(eps)).mean())
        else:
            with torch.no_grad(), amp:
                eps, zhat0 = epsilon_and_clean_latent(z, denoiser.predict(z, step.t).to(z.dtype), denoiser.prediction,
                                                      step.a_t, step.b_t)
            grad = torch.zeros_like(z)
            if step.a_t == 0:
                z0, w = zhat0, 0.0
        z = gaussian_path_step(z, eps, grad, step.a_t, step.b_t, step.a_prev, step.b_prev, w, z0=z0)  # Eqns 11+8+7
    return z, skipped.cpu(), torch.stack(ratios).tolist() if ratios else []


@torch.no_grad()
def sample(denoiser, head, generators, guidance=Guidance(), preprocess=None, num_inference_steps=50, autocast=None,
           progress=True):
    """Algorithm 1 end to end: z_T from one generator per image, guided steps, x = D(z_0).

    denoiser: a Denoiser (families.py); head: an EpistemicHead (used in eval mode); preprocess: images in
    [0, 1] -> the predictor's input, with differentiable ops (e.g. predictor_preprocess(); default: none).
    z and the path math are float32; the network, the decoders and the head each run in their own dtype, so
    a float16 or bfloat16 pipeline needs no autocast.
    """
    check_scheduler(denoiser.scheduler, denoiser.prediction)
    preprocess = preprocess or (lambda x: x)
    device = next(head.parameters()).device
    denoiser.set_timesteps(num_inference_steps, device)
    z = denoiser.initial_latent(generators, device)                             # z_T [B, ...]
    was_training = head.training
    head.eval()
    try:
        signal_fn = image_signal(head, preprocess, guidance.signal)
        z0, skipped, ratios = sample_longtail_ddim(denoiser, z, signal_fn, guidance, autocast, progress)
        images = (denoiser.decode(z0).float() / 2 + 0.5).clamp(0, 1)            # [B, C, H, W]
        h, mu = head.features_and_logits(head_input(head, preprocess, images))
        signals = longtail_signals_by_kind(head.head_logits(h, mu))
    finally:
        head.train(was_training)
    return LTGOutput(images, signals[guidance.signal], signals, mu.argmax(dim=1), skipped, ratios)


def sample_pipeline(pipe, head, prompts, seeds, guidance=Guidance(), guidance_scale=None, num_inference_steps=None,
                    negative_prompt=None, guidance_decoder=None, checkpoint_decoder=False, resolution=None, **kwargs):
    """Longtail-guided images from a diffusers text-to-image pipeline of any supported family (load_pipeline),
    one prompt and one seed per image. guidance_scale and num_inference_steps default to the family's,
    resolution to the pipeline's native one; kwargs go to `sample` (preprocess, autocast, progress)."""
    if len(prompts) != len(seeds):
        raise ValueError(f"ltg: one seed per prompt: got {len(prompts)} prompts and {len(seeds)} seeds")
    denoiser = denoiser_for(pipe, prompts, guidance_scale, negative_prompt=negative_prompt,
                            guidance_decoder=guidance_decoder, checkpoint_decoder=checkpoint_decoder,
                            resolution=resolution)
    generators = [torch.Generator().manual_seed(int(s)) for s in seeds]
    steps = num_inference_steps or family_defaults(pipe)[0]
    return sample(denoiser, head, generators, guidance, num_inference_steps=steps, **kwargs)


def sample_class_conditional(unet, scheduler, head, labels, seeds, guidance=Guidance(), guidance_scale=1.0,
                             **kwargs):
    """Longtail-guided images from a pixel-space class-conditional UNet2DModel, one label and seed per image."""
    if len(labels) != len(seeds):
        raise ValueError(f"ltg: one seed per label: got {len(labels)} labels and {len(seeds)} seeds")
    labels = torch.as_tensor(labels, device=unet.device)
    denoiser = ClassConditionalDenoiser(unet, scheduler, labels, guidance_scale)
    generators = [torch.Generator().manual_seed(int(s)) for s in seeds]
    return sample(denoiser, head, generators, guidance, **kwargs)
