// CPU kernels: at::parallel_for over independent rows or element ranges, contiguous inner loops.
#include "ltg.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <vector>

namespace ltg {
namespace {

// Elements per parallel task, as ATen's own kernels use: below it threading costs more than it saves.
constexpr int64_t kGrain = 32768;

// The entropy kernels sum in double whatever the dtype: a plain sequential float sum of the
// K * C terms of one sample loses ~1e-5 relative (ATen's reductions sum pairwise instead).
using sum_t = double;

// Rows of `row_elems` elements per parallel task.
int64_t row_grain(int64_t row_elems) {
  return std::max<int64_t>(1, kGrain / std::max<int64_t>(1, row_elems));
}

// Eqns 11, 8, 7 on [begin, end). kWriteEps is a template argument so that both variants are
// branch-free loops the compiler vectorises.
template <bool kWriteEps, typename scalar_t, typename acc_t>
void guided_step_range(const scalar_t* __restrict__ z, const scalar_t* __restrict__ eps,
                       const scalar_t* __restrict__ grad, scalar_t* __restrict__ z_prev,
                       scalar_t* __restrict__ eps_hat, const StepCoeffs<acc_t> c, int64_t begin, int64_t end) {
  for (int64_t i = begin; i < end; ++i) {
    acc_t zp, eh;
    guided_step<acc_t>(z[i], eps[i], grad[i], c, zp, eh);
    z_prev[i] = zp;
    if (kWriteEps) eps_hat[i] = eh;
  }
}

}  // namespace

void guided_ddim_step_cpu(const at::Tensor& z, const at::Tensor& eps, const at::Tensor& grad,
                          const StepCoeffs<double>& coeffs, const at::Tensor& z_prev, const at::Tensor& eps_hat) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, z.scalar_type(), "guided_ddim_step_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto c = coeffs.to<acc_t>();
    const scalar_t* zp = z.const_data_ptr<scalar_t>();
    const scalar_t* ep = eps.const_data_ptr<scalar_t>();
    const scalar_t* gp = grad.const_data_ptr<scalar_t>();
    scalar_t* out = z_prev.mutable_data_ptr<scalar_t>();
    scalar_t* out_eps = eps_hat.defined() ? eps_hat.mutable_data_ptr<scalar_t>() : nullptr;
    at::parallel_for(0, z.numel(), kGrain, [&](int64_t begin, int64_t end) {
      if (out_eps) {
        guided_step_range<true>(zp, ep, gp, out, out_eps, c, begin, end);
      } else {
        guided_step_range<false>(zp, ep, gp, out, out_eps, c, begin, end);
      }
    });
  });
}

// Eqn 4, one sample b at a time. Each member row k (C values, cache-hot after the first of its
// three passes) gives its max and sum of exponentials, hence lse_kb and the stable log-softmax
// log p_kc = (x_kc - max) - log S; -p log p adds to the aleatoric sum, and log p_kc joins a
// running log-sum-exp over k kept per class in scratch, which ends as log pbar_c + log K.
void entropy_forward_cpu(const at::Tensor& logits, const at::Tensor& total, const at::Tensor& aleatoric,
                         const at::Tensor& epistemic, const at::Tensor& lse, const at::Tensor& logpbar) {
  const int64_t K = logits.size(0), B = logits.size(1), C = logits.size(2);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "entropy_forward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* x = logits.const_data_ptr<scalar_t>();
    scalar_t* total_p = total.mutable_data_ptr<scalar_t>();
    scalar_t* aleatoric_p = aleatoric.mutable_data_ptr<scalar_t>();
    scalar_t* epistemic_p = epistemic.mutable_data_ptr<scalar_t>();
    acc_t* lse_p = lse.mutable_data_ptr<acc_t>();
    acc_t* logpbar_p = logpbar.mutable_data_ptr<acc_t>();
    const acc_t log_k = std::log(acc_t(K));
    at::parallel_for(0, B, row_grain(K * C), [&](int64_t b_begin, int64_t b_end) {
      std::vector<acc_t> m(C), s(C);  // running log-sum-exp over k, per class
      for (int64_t b = b_begin; b < b_end; ++b) {
        std::fill(m.begin(), m.end(), -INFINITY);
        std::fill(s.begin(), s.end(), acc_t(0));
        sum_t h = 0;  // sum_k H[p_k]
        for (int64_t k = 0; k < K; ++k) {
          const scalar_t* row = x + (k * B + b) * C;
          acc_t mx = -INFINITY;
          for (int64_t c = 0; c < C; ++c) mx = std::max(mx, acc_t(row[c]));
          sum_t sum = 0;
          for (int64_t c = 0; c < C; ++c) sum += std::exp(acc_t(row[c]) - mx);
          const acc_t log_sum = acc_t(std::log(sum));
          lse_p[k * B + b] = mx + log_sum;
          for (int64_t c = 0; c < C; ++c) {
            const acc_t logp = (acc_t(row[c]) - mx) - log_sum;
            add_entropy_term(h, logp);
            lse_push(m[c], s[c], logp);
          }
        }
        sum_t u = 0;  // H[pbar]
        acc_t* lpb = logpbar_p + b * C;
        for (int64_t c = 0; c < C; ++c) {
          lpb[c] = m[c] + std::log(s[c]) - log_k;
          add_entropy_term(u, lpb[c]);
        }
        const sum_t a = h / K;
        total_p[b] = scalar_t(u);
        aleatoric_p[b] = scalar_t(a);
        epistemic_p[b] = scalar_t(u - a);
      }
    });
  });
}

// Eqn 4 backward, one row (k, b) at a time: a pass for H[p_k] and s_k = sum_c p_kc log pbar_c
// (keeping p_kc in scratch), then a pass that writes the gradient.
void entropy_backward_cpu(const at::Tensor& g_total, const at::Tensor& g_aleatoric, const at::Tensor& g_epistemic,
                          const at::Tensor& logits, const at::Tensor& lse, const at::Tensor& logpbar,
                          const at::Tensor& grad_logits) {
  const int64_t K = logits.size(0), B = logits.size(1), C = logits.size(2);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "entropy_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* x = logits.const_data_ptr<scalar_t>();
    const scalar_t* gt = g_total.const_data_ptr<scalar_t>();
    const scalar_t* ga = g_aleatoric.const_data_ptr<scalar_t>();
    const scalar_t* ge = g_epistemic.const_data_ptr<scalar_t>();
    const acc_t* lse_p = lse.const_data_ptr<acc_t>();
    const acc_t* logpbar_p = logpbar.const_data_ptr<acc_t>();
    scalar_t* out = grad_logits.mutable_data_ptr<scalar_t>();
    const acc_t inv_k = acc_t(1) / acc_t(K);
    at::parallel_for(0, K * B, row_grain(C), [&](int64_t r_begin, int64_t r_end) {
      std::vector<acc_t> p(C);
      for (int64_t r = r_begin; r < r_end; ++r) {  // r = k * B + b
        const int64_t b = r % B;
        const scalar_t* row = x + r * C;
        const acc_t* lpb = logpbar_p + b * C;
        const acc_t lse_r = lse_p[r];
        sum_t h_sum = 0, s_sum = 0;
        for (int64_t c = 0; c < C; ++c) {
          const acc_t logp = acc_t(row[c]) - lse_r;
          p[c] = std::exp(logp);
          h_sum -= p[c] * logp;
          s_sum += p[c] * lpb[c];
        }
        const acc_t h = acc_t(h_sum), s = acc_t(s_sum);
        const acc_t gU = acc_t(gt[b]) + acc_t(ge[b]);
        const acc_t gA = acc_t(ga[b]) - acc_t(ge[b]);
        scalar_t* g = out + r * C;
        for (int64_t c = 0; c < C; ++c) {
          g[c] = entropy_grad(p[c], acc_t(row[c]) - lse_r, lpb[c], s, h, gU, gA, inv_k);
        }
      }
    });
  });
}

}  // namespace ltg
