// CPU kernels: at::parallel_for over independent rows or element ranges, contiguous inner loops.
#include "ltg.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>
#include <vector>

// The entropy kernels are built twice on x86-64 with GCC or clang: for the baseline ISA (SSE2) and
// for AVX2 + FMA, picked at run time by what the CPU has. Both come from one source (an
// always-inline body wrapped by two functions): the loops below are written for the compiler to
// vectorise, and at 8 floats a vector instead of 4 they run about twice as fast.
#if (defined(__GNUC__) || defined(__clang__)) && defined(__x86_64__)
#define LTG_AVX2_DISPATCH 1
#define LTG_TARGET_AVX2 __attribute__((target("avx2,fma")))
#else
#define LTG_AVX2_DISPATCH 0
#endif
#if defined(__GNUC__) || defined(__clang__)
#define LTG_INLINE inline __attribute__((always_inline))
#else
#define LTG_INLINE inline
#endif

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

void gaussian_path_step_cpu(const at::Tensor& z, const at::Tensor& eps, const at::Tensor& grad,
                            const StepCoeffs<double>& coeffs, const at::Tensor& z_prev, const at::Tensor& eps_hat) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, z.scalar_type(), "gaussian_path_step_cpu", [&] {
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

// ---------------------------------------------------------------------------------------------
// Eqn 4.
// ---------------------------------------------------------------------------------------------

namespace {

// exp and log for the float kernels, as straight-line code that the compiler vectorises (std::exp
// and std::log are calls it cannot, and were most of the old kernel's time): Cephes' expf and
// logf, within ~1 ulp of the exact result. Float64 keeps std::exp and std::log, to stay exact.
//
// exp(x) for x <= 88 (the kernels pass x <= ~0). Below -87.3 it returns 0 where exp(x) is
// subnormal: the kernels only sum such values, and handle classes where the sum is that small
// exactly (see below). exp(0) is exactly 1.
//
// Written so that GCC vectorises it without -ffast-math: under the default -ftrapping-math it will
// not turn a branch around float arithmetic into a select, and it makes branches of ?: on floats
// (of a clamp on x, say). So there is one ?: and it picks between integer masks; 2^n comes from the
// bits of x / ln 2 + 1.5 * 2^23 (whose low bits hold n), with no float-to-int conversion to clamp.
LTG_INLINE float exp_fast(float x) {
  // n = round(x / ln 2), and x = n ln 2 + r with ln 2 in two parts so that r is exact;
  // then exp(x) = 2^n exp(r), |r| <= ln 2 / 2.
  const float shift = 12582912.0f;  // 1.5 * 2^23
  const float t = x * 1.44269504088896341f + shift;
  const float n = t - shift;
  float r = x - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  float y = 1.9875691500e-4f;
  y = y * r + 1.3981999507e-3f;
  y = y * r + 8.3334519073e-3f;
  y = y * r + 4.1665795894e-2f;
  y = y * r + 1.6666665459e-1f;
  y = y * r + 5.0000001201e-1f;
  y = y * (r * r) + r + 1.0f;
  const float two_n = std::bit_cast<float>((std::bit_cast<uint32_t>(t) - 0x4b400000u + 127u) << 23);
  const uint32_t keep = x < -87.33654f ? 0u : ~0u;  // below, 2^n is garbage: flush to 0
  return std::bit_cast<float>(std::bit_cast<uint32_t>(y * two_n) & keep);
}

// log(x) for normal x > 0 (the kernels pass x >= FLT_MIN): x = 2^e m with m in [sqrt(1/2), sqrt(2)),
// log x = e ln 2 + log m, log m by a polynomial in m - 1. The select is by mask, as in exp_fast.
LTG_INLINE float log_fast(float x) {
  const uint32_t bits = std::bit_cast<uint32_t>(x);
  float e = float(int32_t(bits >> 23) - 126);
  float m = std::bit_cast<float>((bits & 0x007fffffu) | 0x3f000000u);  // in [0.5, 1)
  const uint32_t small = m < 0.707106781186547524f ? ~0u : 0u;    // then use 2m, e - 1
  e = e - std::bit_cast<float>(std::bit_cast<uint32_t>(1.0f) & small);
  m = (m - 1.0f) + std::bit_cast<float>(std::bit_cast<uint32_t>(m) & small);  // exact
  const float z = m * m;
  float y = 7.0376836292e-2f;
  y = y * m - 1.1514610310e-1f;
  y = y * m + 1.1676998740e-1f;
  y = y * m - 1.2420140846e-1f;
  y = y * m + 1.4249322787e-1f;
  y = y * m - 1.6668057665e-1f;
  y = y * m + 2.0000714765e-1f;
  y = y * m - 2.4999993993e-1f;
  y = y * m + 3.3333331174e-1f;
  y = y * m * z;
  y = y + e * -2.12194440e-4f;
  y = y - 0.5f * z;
  return (m + y) + e * 0.693359375f;
}

// max(x, lo) for x, lo >= 0, whose bits order as integers do: an integer max, which vectorises.
LTG_INLINE float max_nonneg(float x, float lo) {
  return std::bit_cast<float>(std::max(std::bit_cast<int32_t>(x), std::bit_cast<int32_t>(lo)));
}
LTG_INLINE double max_nonneg(double x, double lo) { return std::max(x, lo); }

LTG_INLINE double exp_fast(double x) { return std::exp(x); }
LTG_INLINE double log_fast(double x) { return std::log(x); }

// sum_i f(i), each term widened to sum_t. f may also store to arrays at i: the passes over a row
// are fused into the reductions that need them. Without -ffast-math the compiler may not reorder a
// sum, so it would not vectorise this loop; `omp simd reduction` allows it to (we build with
// -fopenmp; without, the pragma is ignored and the loop runs scalar, with the same results to
// rounding). (Explicit partial sums in an array do the same for a pure reduction, but GCC stops
// vectorising them as soon as the loop also stores.)
template <typename F>
LTG_INLINE sum_t sum_of(int64_t n, F f) {
  sum_t s = 0;
#pragma omp simd reduction(+ : s)
  for (int64_t i = 0; i < n; ++i) s += sum_t(f(i));
  return s;
}

// max_i x[i]. For float as an integer max (which the compiler does vectorise) of keys that order
// as the floats do: a float's bits, with the magnitude bits of negatives flipped. (The map is its
// own inverse.)
LTG_INLINE int32_t float_order_key(int32_t bits) { return bits ^ ((bits >> 31) & 0x7fffffff); }

template <typename T>
LTG_INLINE T max_of(const T* x, int64_t n) {
  T m = x[0];
  for (int64_t i = 1; i < n; ++i) m = std::max(m, x[i]);
  return m;
}

template <>
LTG_INLINE float max_of(const float* x, int64_t n) {
  int32_t m = std::numeric_limits<int32_t>::min();
  for (int64_t i = 0; i < n; ++i) m = std::max(m, float_order_key(std::bit_cast<int32_t>(x[i])));
  return std::bit_cast<float>(float_order_key(m));
}

// The softmax of one member row, which the forward and the backward both need: e = exp(x - max)
// once per element, S = sum e, then p = e / S and log p = (x - max) - log S, into p and logp, bit
// for bit the same in both passes. Returns lse = max + log S. (The backward recomputes it rather
// than use x - lse, which for logits of size L rounds to ~L eps: a relative error in p of the same.)
// `then(c, p_c, logp_c)` runs on each class once they are final, and its values are summed: it
// fuses the callers' own pass over the row with the last of these. (Values are passed, not
// re-read from the arrays, and no lambda loads what it stores: either stops GCC vectorising.)
template <typename scalar_t, typename acc_t, typename F>
LTG_INLINE acc_t softmax_row(const scalar_t* __restrict__ row, int64_t C, acc_t* __restrict__ logp,
                             acc_t* __restrict__ p, sum_t& then_sum, F then) {
  for (int64_t c = 0; c < C; ++c) logp[c] = acc_t(row[c]);
  const acc_t mx = max_of(logp, C);
  const sum_t sum = sum_of(C, [=](int64_t c) {
    const acc_t d = logp[c] - mx;
    const acc_t e = exp_fast(d);  // <= 1, and exactly 1 at the max: S >= 1, log S >= 0, log p <= 0
    logp[c] = d;
    p[c] = e;
    return e;
  });
  const acc_t log_sum = acc_t(std::log(sum)), inv_sum = acc_t(1 / sum);
  then_sum = sum_of(C, [=](int64_t c) {
    const acc_t pc = p[c] * inv_sum, lc = logp[c] - log_sum;
    p[c] = pc;
    logp[c] = lc;
    return then(c, pc, lc);
  });
  return mx + log_sum;
}

template <typename scalar_t>
struct ForwardArgs {
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t* x;
  scalar_t *total, *aleatoric, *epistemic;
  acc_t *lse, *logpbar;
  int64_t K, B, C;
};

// Eqn 4 for samples [b_begin, b_end). Per member row k (C values, in L1 from its first pass on):
// its softmax, H[p_k], and q_c += p_kc. Then log pbar_c = log q_c - log K, one log per class, and
// H[pbar] with pbar = q / K.
//
// q_c underflows (< the smallest normal) only where every member's p_kc does: there log pbar_c
// comes from an exact log-sum-exp of the log p_kc over k, so it stays finite and accurate (for
// logits 1e4 apart it is about -1e4, where q_c would be 0 and its log -inf).
//
// With K = 1, pbar = p: log pbar is log p and H[pbar] is H[p], bit for bit, so epistemic is 0.
template <typename scalar_t>
LTG_INLINE void entropy_forward_impl(const ForwardArgs<scalar_t>& a, int64_t b_begin, int64_t b_end) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t K = a.K, B = a.B, C = a.C;
  const acc_t tiny = std::numeric_limits<acc_t>::min();
  const acc_t log_k = std::log(acc_t(K)), inv_k = acc_t(1) / acc_t(K);
  std::vector<acc_t> scratch(3 * C);
  acc_t* __restrict__ logp = scratch.data();
  acc_t* __restrict__ p = logp + C;
  acc_t* __restrict__ q = p + C;  // sum_k p_kc, then pbar_c
  for (int64_t b = b_begin; b < b_end; ++b) {
    acc_t* __restrict__ lpb = a.logpbar + b * C;
    std::fill(q, q + C, acc_t(0));
    sum_t h = 0;  // sum_k H[p_k]
    for (int64_t k = 0; k < K; ++k) {
      sum_t h_k;
      a.lse[k * B + b] = softmax_row(a.x + (k * B + b) * C, C, logp, p, h_k, [=](int64_t c, acc_t pc, acc_t lc) {
        q[c] += pc;
        return entropy_term(pc, lc);
      });
      h += h_k;
    }
    sum_t u = h;  // H[pbar]
    if (K == 1) {
      std::copy(logp, logp + C, lpb);
    } else {
      for (int64_t c = 0; c < C; ++c) lpb[c] = log_fast(max_nonneg(q[c], tiny)) - log_k;
      for (int64_t c = 0; c < C; ++c) {
        if (q[c] >= tiny) continue;
        acc_t m = -INFINITY, s = 0;
        for (int64_t k = 0; k < K; ++k) lse_push(m, s, acc_t(a.x[(k * B + b) * C + c]) - a.lse[k * B + b]);
        lpb[c] = m + std::log(s) - log_k;
      }
      u = sum_of(C, [=](int64_t c) { return entropy_term(q[c] * inv_k, lpb[c]); });
    }
    const sum_t al = h / K;
    a.total[b] = scalar_t(u);
    a.aleatoric[b] = scalar_t(al);
    a.epistemic[b] = scalar_t(u - al);
  }
}

template <typename scalar_t>
struct BackwardArgs {
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t *gt, *ga, *ge, *x;
  const acc_t* logpbar;
  scalar_t* out;
  int64_t B, C;
  acc_t inv_k;
};

// Eqn 4 backward for rows [r_begin, r_end), r = k * B + b: the row's softmax with H[p_k], then
// s_k = sum_c p_kc log pbar_c, then the gradient.
template <typename scalar_t>
LTG_INLINE void entropy_backward_impl(const BackwardArgs<scalar_t>& a, int64_t r_begin, int64_t r_end) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t B = a.B, C = a.C;
  std::vector<acc_t> scratch(2 * C);
  acc_t* __restrict__ logp = scratch.data();
  acc_t* __restrict__ p = logp + C;
  for (int64_t r = r_begin; r < r_end; ++r) {
    const int64_t b = r % B;
    const acc_t* __restrict__ lpb = a.logpbar + b * C;
    sum_t h_sum;
    softmax_row(a.x + r * C, C, logp, p, h_sum, [](int64_t, acc_t pc, acc_t lc) { return entropy_term(pc, lc); });
    const acc_t h = acc_t(h_sum);
    const acc_t s = acc_t(sum_of(C, [=](int64_t c) { return p[c] * lpb[c]; }));
    const acc_t gU = acc_t(a.gt[b]) + acc_t(a.ge[b]);
    const acc_t gA = acc_t(a.ga[b]) - acc_t(a.ge[b]);
    scalar_t* __restrict__ g = a.out + r * C;
    for (int64_t c = 0; c < C; ++c) g[c] = entropy_grad(p[c], logp[c], lpb[c], s, h, gU, gA, a.inv_k);
  }
}

// The two builds of each kernel, and the run-time choice between them. Float64 stays on the
// baseline build: its time is in std::exp, which no vector unit speeds up.
template <typename scalar_t>
void entropy_forward_base(const ForwardArgs<scalar_t>& a, int64_t begin, int64_t end) {
  entropy_forward_impl(a, begin, end);
}
template <typename scalar_t>
void entropy_backward_base(const BackwardArgs<scalar_t>& a, int64_t begin, int64_t end) {
  entropy_backward_impl(a, begin, end);
}

#if LTG_AVX2_DISPATCH
template <typename scalar_t>
LTG_TARGET_AVX2 void entropy_forward_avx2(const ForwardArgs<scalar_t>& a, int64_t begin, int64_t end) {
  entropy_forward_impl(a, begin, end);
}
template <typename scalar_t>
LTG_TARGET_AVX2 void entropy_backward_avx2(const BackwardArgs<scalar_t>& a, int64_t begin, int64_t end) {
  entropy_backward_impl(a, begin, end);
}

bool cpu_has_avx2() {
  static const bool has = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return has;
}
#endif

template <typename scalar_t>
void entropy_forward_range(const ForwardArgs<scalar_t>& a, int64_t begin, int64_t end) {
#if LTG_AVX2_DISPATCH
  if constexpr (!std::is_same_v<scalar_t, double>) {
    if (cpu_has_avx2()) return entropy_forward_avx2(a, begin, end);
  }
#endif
  entropy_forward_base(a, begin, end);
}

template <typename scalar_t>
void entropy_backward_range(const BackwardArgs<scalar_t>& a, int64_t begin, int64_t end) {
#if LTG_AVX2_DISPATCH
  if constexpr (!std::is_same_v<scalar_t, double>) {
    if (cpu_has_avx2()) return entropy_backward_avx2(a, begin, end);
  }
#endif
  entropy_backward_base(a, begin, end);
}

}  // namespace

void entropy_forward_cpu(const at::Tensor& logits, const at::Tensor& total, const at::Tensor& aleatoric,
                         const at::Tensor& epistemic, const at::Tensor& lse, const at::Tensor& logpbar) {
  const int64_t K = logits.size(0), B = logits.size(1), C = logits.size(2);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "entropy_forward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const ForwardArgs<scalar_t> args{logits.const_data_ptr<scalar_t>(), total.mutable_data_ptr<scalar_t>(),
                                     aleatoric.mutable_data_ptr<scalar_t>(), epistemic.mutable_data_ptr<scalar_t>(),
                                     lse.mutable_data_ptr<acc_t>(), logpbar.mutable_data_ptr<acc_t>(), K, B, C};
    at::parallel_for(0, B, row_grain(K * C), [&](int64_t begin, int64_t end) {
      entropy_forward_range(args, begin, end);
    });
  });
}

void entropy_backward_cpu(const at::Tensor& g_total, const at::Tensor& g_aleatoric, const at::Tensor& g_epistemic,
                          const at::Tensor& logits, const at::Tensor& lse, const at::Tensor& logpbar,
                          const at::Tensor& grad_logits) {
  const int64_t K = logits.size(0), B = logits.size(1), C = logits.size(2);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "entropy_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const BackwardArgs<scalar_t> args{g_total.const_data_ptr<scalar_t>(), g_aleatoric.const_data_ptr<scalar_t>(),
                                      g_epistemic.const_data_ptr<scalar_t>(), logits.const_data_ptr<scalar_t>(),
                                      logpbar.const_data_ptr<acc_t>(), grad_logits.mutable_data_ptr<scalar_t>(), B, C, acc_t(1) / acc_t(K)};
    at::parallel_for(0, K * B, row_grain(C), [&](int64_t begin, int64_t end) {
      entropy_backward_range(args, begin, end);
    });
  });
}

}  // namespace ltg
