// CUDA kernels: a grid-stride vectorised pass for the step; a block per sample (forward) and a warp
// per member row (backward) for the signals. Arithmetic is float32 for half types.
#include "ltg.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include <algorithm>
#include <cstdint>

namespace ltg {
namespace {

constexpr int kThreads = 256;
constexpr int kWarp = 32;
constexpr int kWarps = kThreads / kWarp;
constexpr int kMaxSharedBytes = 48 * 1024;  // dynamic shared memory without an opt-in

int64_t ceil_div(int64_t a, int64_t b) {
  return (a + b - 1) / b;
}

// Enough blocks to fill the device; grid-stride loops cover the rest.
unsigned int grid_for(int64_t work) {
  const int64_t resident = int64_t(at::cuda::getCurrentDeviceProperties()->multiProcessorCount) * (2048 / kThreads);
  return unsigned(std::max<int64_t>(1, std::min(ceil_div(work, kThreads), resident)));
}

bool aligned16(const void* p) {
  return reinterpret_cast<std::uintptr_t>(p) % 16 == 0;
}

template <typename T>
__device__ T warp_max(T v) {
  for (int offset = kWarp / 2; offset > 0; offset /= 2) v = max(v, __shfl_xor_sync(0xffffffffu, v, offset));
  return v;
}

template <typename T>
__device__ T warp_sum(T v) {
  for (int offset = kWarp / 2; offset > 0; offset /= 2) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

// Sum over a block of kThreads threads, returned to every thread; buf holds kWarps values.
template <typename T>
__device__ T block_sum(T v, T* buf) {
  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
  v = warp_sum(v);
  if (lane == 0) buf[warp] = v;
  __syncthreads();
  v = warp_sum(lane < kWarps ? buf[lane] : T(0));
  __syncthreads();  // buf may be reused
  return v;
}

// ---------------------------------------------------------------------------------------------
// Eqns 11, 8, 7.
// ---------------------------------------------------------------------------------------------

// N consecutive elements, N * sizeof(scalar_t) bytes aligned to that size: one load or store each.
template <typename scalar_t, int N>
struct alignas(sizeof(scalar_t) * N) Pack {
  scalar_t v[N];
};

// The step on pack i of N elements.
template <int N, typename scalar_t, typename acc_t>
__device__ __forceinline__ void step_pack(const scalar_t* __restrict__ z, const scalar_t* __restrict__ eps,
                                          const scalar_t* __restrict__ grad, scalar_t* __restrict__ z_prev,
                                          scalar_t* __restrict__ eps_hat, int64_t i, const StepCoeffs<acc_t>& c) {
  using P = Pack<scalar_t, N>;
  const P zv = reinterpret_cast<const P*>(z)[i];
  const P ev = reinterpret_cast<const P*>(eps)[i];
  const P gv = reinterpret_cast<const P*>(grad)[i];
  P zo, eo;
#pragma unroll
  for (int j = 0; j < N; ++j) {
    acc_t zp, eh;
    guided_step<acc_t>(zv.v[j], ev.v[j], gv.v[j], c, zp, eh);
    zo.v[j] = zp;
    eo.v[j] = eh;
  }
  reinterpret_cast<P*>(z_prev)[i] = zo;
  if (eps_hat != nullptr) reinterpret_cast<P*>(eps_hat)[i] = eo;
}

// Grid-stride over whole packs of N elements, then the n % N elements left, one per thread.
template <int N, typename scalar_t, typename acc_t>
__global__ void guided_step_kernel(const scalar_t* __restrict__ z, const scalar_t* __restrict__ eps,
                                   const scalar_t* __restrict__ grad, scalar_t* __restrict__ z_prev,
                                   scalar_t* __restrict__ eps_hat, int64_t n, const StepCoeffs<acc_t> c) {
  const int64_t tid = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t n_packs = n / N;
  for (int64_t i = tid; i < n_packs; i += int64_t(gridDim.x) * blockDim.x) {
    step_pack<N>(z, eps, grad, z_prev, eps_hat, i, c);
  }
  const int64_t tail = n_packs * N + tid;
  if (tail < n) step_pack<1>(z, eps, grad, z_prev, eps_hat, tail, c);
}

// ---------------------------------------------------------------------------------------------
// Eqn 4.
// ---------------------------------------------------------------------------------------------

// One block per sample b. First one warp per member row k: its max and log of the sum of
// exponentials, kept in shared memory (2K values). Then one thread per class c: log p_kc over k
// into -p log p (the aleatoric sum) and a running log-sum-exp that ends as log pbar_c + log K.
template <typename scalar_t, typename acc_t>
__global__ void entropy_forward_kernel(const scalar_t* __restrict__ x, int64_t K, int64_t B, int64_t C,
                                       acc_t log_k, scalar_t* __restrict__ total, scalar_t* __restrict__ aleatoric,
                                       scalar_t* __restrict__ epistemic, acc_t* __restrict__ lse,
                                       acc_t* __restrict__ logpbar) {
  extern __shared__ unsigned char shared[];
  acc_t* row_max = reinterpret_cast<acc_t*>(shared);
  acc_t* row_log_sum = row_max + K;
  __shared__ acc_t buf[kWarps];
  const int64_t b = blockIdx.x;
  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;

  for (int64_t k = warp; k < K; k += kWarps) {
    const scalar_t* row = x + (k * B + b) * C;
    acc_t mx = -INFINITY;
    for (int64_t c = lane; c < C; c += kWarp) mx = max(mx, acc_t(row[c]));
    mx = warp_max(mx);
    acc_t sum = 0;
    for (int64_t c = lane; c < C; c += kWarp) sum += exp(acc_t(row[c]) - mx);
    const acc_t log_sum = log(warp_sum(sum));
    if (lane == 0) {
      row_max[k] = mx;
      row_log_sum[k] = log_sum;
      lse[k * B + b] = mx + log_sum;
    }
  }
  __syncthreads();

  acc_t h = 0, u = 0;  // this thread's shares of sum_k H[p_k] and of H[pbar]
  for (int64_t c = threadIdx.x; c < C; c += kThreads) {
    acc_t m = -INFINITY, s = 0;
    for (int64_t k = 0; k < K; ++k) {
      const acc_t logp = (acc_t(x[(k * B + b) * C + c]) - row_max[k]) - row_log_sum[k];
      add_entropy_term(h, logp);
      lse_push(m, s, logp);
    }
    const acc_t lpb = m + log(s) - log_k;
    logpbar[b * C + c] = lpb;
    add_entropy_term(u, lpb);
  }
  h = block_sum(h, buf);
  u = block_sum(u, buf);
  if (threadIdx.x == 0) {
    const acc_t a = h / acc_t(K);
    total[b] = u;
    aleatoric[b] = a;
    epistemic[b] = u - a;
  }
}

// One warp per member row r = k * B + b: a pass for H[p_k] and s_k = sum_c p_kc log pbar_c, then a
// pass that writes the gradient (recomputing p_kc: cheaper than keeping it).
template <typename scalar_t, typename acc_t>
__global__ void entropy_backward_kernel(const scalar_t* __restrict__ g_total, const scalar_t* __restrict__ g_aleatoric,
                                        const scalar_t* __restrict__ g_epistemic, const scalar_t* __restrict__ x,
                                        const acc_t* __restrict__ lse, const acc_t* __restrict__ logpbar,
                                        scalar_t* __restrict__ out, int64_t rows, int64_t B, int64_t C, acc_t inv_k) {
  const int64_t r = int64_t(blockIdx.x) * kWarps + threadIdx.x / kWarp;
  if (r >= rows) return;  // a whole warp at once: no block-wide synchronisation follows
  const int lane = threadIdx.x % kWarp;
  const int64_t b = r % B;
  const scalar_t* row = x + r * C;
  const acc_t* lpb = logpbar + b * C;
  const acc_t lse_r = lse[r];

  acc_t h = 0, s = 0;
  for (int64_t c = lane; c < C; c += kWarp) {
    const acc_t logp = acc_t(row[c]) - lse_r;
    const acc_t p = exp(logp);
    h -= p * logp;
    s += p * lpb[c];
  }
  h = warp_sum(h);
  s = warp_sum(s);
  const acc_t gU = acc_t(g_total[b]) + acc_t(g_epistemic[b]);
  const acc_t gA = acc_t(g_aleatoric[b]) - acc_t(g_epistemic[b]);
  for (int64_t c = lane; c < C; c += kWarp) {
    const acc_t logp = acc_t(row[c]) - lse_r;
    out[r * C + c] = entropy_grad(exp(logp), logp, lpb[c], s, h, gU, gA, inv_k);
  }
}

}  // namespace

void gaussian_path_step_cuda(const at::Tensor& z, const at::Tensor& eps, const at::Tensor& grad,
                             const StepCoeffs<double>& coeffs, const at::Tensor& z_prev, const at::Tensor& eps_hat) {
  const c10::cuda::CUDAGuard guard(z.device());
  const int64_t n = z.numel();
  if (n == 0) return;
  const auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, z.scalar_type(), "gaussian_path_step_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto c = coeffs.to<acc_t>();
    const scalar_t* zp = z.const_data_ptr<scalar_t>();
    const scalar_t* ep = eps.const_data_ptr<scalar_t>();
    const scalar_t* gp = grad.const_data_ptr<scalar_t>();
    scalar_t* out = z_prev.mutable_data_ptr<scalar_t>();
    scalar_t* out_eps = eps_hat.defined() ? eps_hat.mutable_data_ptr<scalar_t>() : nullptr;
    constexpr int kVec = 16 / sizeof(scalar_t);
    // Views can start anywhere; 16-byte accesses need all five pointers 16-byte aligned.
    if (aligned16(zp) && aligned16(ep) && aligned16(gp) && aligned16(out) && aligned16(out_eps)) {
      guided_step_kernel<kVec><<<grid_for(ceil_div(n, kVec)), kThreads, 0, stream>>>(zp, ep, gp, out, out_eps, n, c);
    } else {
      guided_step_kernel<1><<<grid_for(n), kThreads, 0, stream>>>(zp, ep, gp, out, out_eps, n, c);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

void entropy_forward_cuda(const at::Tensor& logits, const at::Tensor& total, const at::Tensor& aleatoric,
                          const at::Tensor& epistemic, const at::Tensor& lse, const at::Tensor& logpbar) {
  const c10::cuda::CUDAGuard guard(logits.device());
  const int64_t K = logits.size(0), B = logits.size(1), C = logits.size(2);
  const auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "entropy_forward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const int64_t shared_bytes = 2 * K * int64_t(sizeof(acc_t));
    TORCH_CHECK(shared_bytes <= kMaxSharedBytes, "ltg: the CUDA entropy kernel takes at most ",
                kMaxSharedBytes / (2 * sizeof(acc_t)), " members K, got ", K);
    entropy_forward_kernel<<<B, kThreads, shared_bytes, stream>>>(
        logits.const_data_ptr<scalar_t>(), K, B, C, acc_t(std::log(double(K))), total.mutable_data_ptr<scalar_t>(),
        aleatoric.mutable_data_ptr<scalar_t>(), epistemic.mutable_data_ptr<scalar_t>(), lse.mutable_data_ptr<acc_t>(),
        logpbar.mutable_data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

void entropy_backward_cuda(const at::Tensor& g_total, const at::Tensor& g_aleatoric, const at::Tensor& g_epistemic,
                           const at::Tensor& logits, const at::Tensor& lse, const at::Tensor& logpbar,
                           const at::Tensor& grad_logits) {
  const c10::cuda::CUDAGuard guard(logits.device());
  const int64_t K = logits.size(0), B = logits.size(1), C = logits.size(2);
  const auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "entropy_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    entropy_backward_kernel<<<ceil_div(K * B, kWarps), kThreads, 0, stream>>>(
        g_total.const_data_ptr<scalar_t>(), g_aleatoric.const_data_ptr<scalar_t>(),
        g_epistemic.const_data_ptr<scalar_t>(), logits.const_data_ptr<scalar_t>(), lse.const_data_ptr<acc_t>(),
        logpbar.const_data_ptr<acc_t>(), grad_logits.mutable_data_ptr<scalar_t>(), K * B, B, C,
        acc_t(1) / acc_t(K));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace ltg
