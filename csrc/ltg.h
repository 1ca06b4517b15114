// Shared declarations of the _ltg kernels, and the per-element math that the CPU and CUDA kernels
// both inline, so the two devices compute the same formulas in the same order (see ltg.py).
#pragma once

#include <ATen/core/Tensor.h>

#include <cmath>

#ifdef __CUDACC__
#define LTG_HOST_DEVICE __host__ __device__
#else
#define LTG_HOST_DEVICE
#endif

namespace ltg {

// ---------------------------------------------------------------------------------------------
// Eqns 11, 8, 7: the guided step on the path z_t = a_t x0 + b_t eps (a_t > 0; ltg.py handles a_t = 0).
// ---------------------------------------------------------------------------------------------

// The step's scalar coefficients. Made once on the host in double, then cast to the kernel's
// arithmetic type, as torch casts a Python float when it multiplies a tensor by it.
template <typename T>
struct StepCoeffs {
  T w_b_t;   // w * b_t
  T b_t;
  T a_t;
  T a_prev;
  T b_prev;

  template <typename U>
  StepCoeffs<U> to() const {
    return {U(w_b_t), U(b_t), U(a_t), U(a_prev), U(b_prev)};
  }
};

inline StepCoeffs<double> step_coeffs(double a_t, double b_t, double a_prev, double b_prev, double w) {
  return {w * b_t, b_t, a_t, a_prev, b_prev};
}

// One element of the step, in the reference's order.
template <typename T>
LTG_HOST_DEVICE inline void guided_step(T z, T eps, T grad, const StepCoeffs<T>& c, T& z_prev, T& eps_hat) {
  eps_hat = eps - c.w_b_t * grad;                   // Eqn 11
  const T z0 = (z - c.b_t * eps_hat) / c.a_t;       // Eqn 8, from eps_hat
  z_prev = c.a_prev * z0 + c.b_prev * eps_hat;      // Eqn 7 (DDIM, eta = 0; Euler for rectified flow)
}

// ---------------------------------------------------------------------------------------------
// Eqn 4: the longtail signals of logits [K, B, C].
// ---------------------------------------------------------------------------------------------

// Adds l to a running log-sum-exp held as (max m, sum s of exp(. - m)). One exp per call: the
// smaller of (l, m) is rescaled to the larger, so exp never overflows. Selects, not branches:
// which is larger is data-dependent and mispredicts.
template <typename T>
LTG_HOST_DEVICE inline void lse_push(T& m, T& s, T l) {
  using std::exp;
  using std::fabs;
  const T d = l - m;
  const T e = exp(-fabs(d));
  const bool up = d > T(0);
  s = up ? s * e + T(1) : s + e;
  m = up ? l : m;
}

// h += -p log p for one class given its log-probability (the CUDA kernel: one exp per term).
// Every entropy, per member and of the mean, is summed through this one function from
// log-probabilities, so with K = 1 (where log pbar == log p bit for bit) total and aleatoric agree
// exactly and epistemic is exactly 0. Each term is >= 0: no cancellation however large the logits.
// S may be wider than T.
template <typename S, typename T>
LTG_HOST_DEVICE inline void add_entropy_term(S& h, T logp) {
  using std::exp;
  h -= S(exp(logp) * logp);
}

// -p log p for one class given p and log p both (the CPU kernel, which has p at hand and so needs
// no exp). log p is clamped to <= 0, so the term is >= 0 even where rounding puts p a hair over 1.
// The CPU kernel keeps the K = 1 invariant above by construction: there pbar = p, so it writes
// log pbar = log p and H[pbar] = H[p] bit for bit, and epistemic is exactly 0.
template <typename T>
LTG_HOST_DEVICE inline T entropy_term(T p, T logp) {
  return -(p * (logp < T(0) ? logp : T(0)));
}

// d(a U + b A + c E)/dx_kj with gU = a + c, gA = b - c, p = p_kj, logp = log p_kj,
// s = sum_c p_kc log pbar_c, h = H[p_k]:
//   dU/dx_kj = -p (log pbar_j - s) / K,   dA/dx_kj = -p (log p + h) / K.
template <typename T>
LTG_HOST_DEVICE inline T entropy_grad(T p, T logp, T logpbar, T s, T h, T gU, T gA, T inv_k) {
  return -inv_k * p * (gU * (logpbar - s) + gA * (logp + h));
}

// ---------------------------------------------------------------------------------------------
// Kernels. Inputs are checked and outputs allocated by ltg.cpp; every tensor is contiguous and
// on one device; lse and logpbar have the accumulation dtype (float64 for float64 logits, else
// float32), the g_* have the logits dtype.
// ---------------------------------------------------------------------------------------------

// eps_hat may be undefined: then only z_prev is written.
void gaussian_path_step_cpu(const at::Tensor& z, const at::Tensor& eps, const at::Tensor& grad,
                            const StepCoeffs<double>& coeffs, const at::Tensor& z_prev, const at::Tensor& eps_hat);
void entropy_forward_cpu(const at::Tensor& logits, const at::Tensor& total, const at::Tensor& aleatoric,
                         const at::Tensor& epistemic, const at::Tensor& lse, const at::Tensor& logpbar);
void entropy_backward_cpu(const at::Tensor& g_total, const at::Tensor& g_aleatoric, const at::Tensor& g_epistemic,
                          const at::Tensor& logits, const at::Tensor& lse, const at::Tensor& logpbar,
                          const at::Tensor& grad_logits);

#ifdef WITH_CUDA
void gaussian_path_step_cuda(const at::Tensor& z, const at::Tensor& eps, const at::Tensor& grad,
                             const StepCoeffs<double>& coeffs, const at::Tensor& z_prev, const at::Tensor& eps_hat);
void entropy_forward_cuda(const at::Tensor& logits, const at::Tensor& total, const at::Tensor& aleatoric,
                          const at::Tensor& epistemic, const at::Tensor& lse, const at::Tensor& logpbar);
void entropy_backward_cuda(const at::Tensor& g_total, const at::Tensor& g_aleatoric, const at::Tensor& g_epistemic,
                           const at::Tensor& logits, const at::Tensor& lse, const at::Tensor& logpbar,
                           const at::Tensor& grad_logits);
#endif

}  // namespace ltg
