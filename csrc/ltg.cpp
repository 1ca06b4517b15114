// The _ltg module: argument checks, output allocation and device dispatch. The kernels are in
// ltg_cpu.cpp and ltg_cuda.cu; ltg.py holds the pure-torch references they must agree with.
#include "ltg.h"

#include <torch/extension.h>

#include <cmath>
#include <tuple>

namespace ltg {
namespace {

at::ScalarType acc_dtype(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

void check_tensor(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.defined(), "ltg: ", name, " is undefined");
  TORCH_CHECK(t.is_cpu() || t.is_cuda(), "ltg: ", name, " must be on CPU or CUDA, got ", t.device());
  TORCH_CHECK(t.is_contiguous(), "ltg: ", name, " must be contiguous");
}

void check_float(const at::Tensor& t, const char* name) {
  const auto d = t.scalar_type();
  TORCH_CHECK(d == at::kFloat || d == at::kDouble || d == at::kHalf || d == at::kBFloat16,
              "ltg: ", name, " must be float16, bfloat16, float32 or float64, got ", d);
}

// `t` must match `ref` in dtype and device, and have shape `shape`.
void check_like(const at::Tensor& t, const char* name, const at::Tensor& ref, const char* ref_name,
                at::ScalarType dtype, at::IntArrayRef shape) {
  check_tensor(t, name);
  TORCH_CHECK(t.device() == ref.device(), "ltg: ", name, " must be on the device of ", ref_name, " (",
              ref.device(), "), got ", t.device());
  TORCH_CHECK(t.scalar_type() == dtype, "ltg: ", name, " must have dtype ", dtype, ", got ", t.scalar_type());
  TORCH_CHECK(t.sizes() == shape, "ltg: ", name, " must have shape ", shape, ", got ", t.sizes());
}

// Whether to run the CUDA kernels for tensors on t's device; a clear error if they were not built.
bool on_cuda(const at::Tensor& t) {
#ifndef WITH_CUDA
  TORCH_CHECK(!t.is_cuda(), "ltg: got a CUDA tensor, but _ltg was built without CUDA kernels; rebuild it on a "
              "machine with CUDA, or with FORCE_CUDA=1 (pip install --no-build-isolation -e .)");
#endif
  return t.is_cuda();
}

void check_logits(const at::Tensor& logits) {
  check_tensor(logits, "logits");
  check_float(logits, "logits");
  TORCH_CHECK(logits.dim() == 3, "ltg: logits must have shape [K, B, C], got ", logits.sizes());
  TORCH_CHECK(logits.numel() > 0, "ltg: logits must be non-empty, got shape ", logits.sizes());
}

}  // namespace

// Eqns 11, 8, 7 on the path z_t = a_t x0 + b_t eps: z_prev (and eps_hat when write_eps) from z_t, eps,
// grad, in one pass.
std::tuple<at::Tensor, at::Tensor> gaussian_path_step(const at::Tensor& z, const at::Tensor& eps, const at::Tensor& grad,
                                                      double a_t, double b_t, double a_prev, double b_prev, double w,
                                                      bool write_eps) {
  check_tensor(z, "z");
  check_float(z, "z");
  check_like(eps, "eps", z, "z", z.scalar_type(), z.sizes());
  check_like(grad, "grad", z, "z", z.scalar_type(), z.sizes());
  TORCH_CHECK(std::isfinite(a_t) && a_t > 0.0, "ltg: a_t must be finite and > 0 (Eqn 8 divides by it), got ", a_t);
  TORCH_CHECK(std::isfinite(b_t) && b_t >= 0.0, "ltg: b_t must be finite and >= 0, got ", b_t);
  TORCH_CHECK(std::isfinite(a_prev) && a_prev >= 0.0, "ltg: a_prev must be finite and >= 0, got ", a_prev);
  TORCH_CHECK(std::isfinite(b_prev) && b_prev >= 0.0, "ltg: b_prev must be finite and >= 0, got ", b_prev);
  TORCH_CHECK(std::isfinite(w), "ltg: guidance weight w must be finite, got ", w);

  const at::Tensor z_prev = at::empty_like(z);
  const at::Tensor eps_hat = write_eps ? at::empty_like(z) : at::Tensor();
  const StepCoeffs<double> coeffs = step_coeffs(a_t, b_t, a_prev, b_prev, w);
  if (on_cuda(z)) {
#ifdef WITH_CUDA
    gaussian_path_step_cuda(z, eps, grad, coeffs, z_prev, eps_hat);
#endif
  } else {
    gaussian_path_step_cpu(z, eps, grad, coeffs, z_prev, eps_hat);
  }
  return {z_prev, eps_hat};
}

// Eqn 4: logits [K, B, C] -> total, aleatoric, epistemic [B], and lse [K, B] and logpbar [B, C]
// (in the accumulation dtype) for the backward.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> entropy_forward(const at::Tensor& logits) {
  check_logits(logits);
  const int64_t K = logits.size(0), B = logits.size(1), C = logits.size(2);
  const auto acc = logits.options().dtype(acc_dtype(logits.scalar_type()));
  const at::Tensor total = at::empty({B}, logits.options());
  const at::Tensor aleatoric = at::empty({B}, logits.options());
  const at::Tensor epistemic = at::empty({B}, logits.options());
  const at::Tensor lse = at::empty({K, B}, acc);
  const at::Tensor logpbar = at::empty({B, C}, acc);
  if (on_cuda(logits)) {
#ifdef WITH_CUDA
    entropy_forward_cuda(logits, total, aleatoric, epistemic, lse, logpbar);
#endif
  } else {
    entropy_forward_cpu(logits, total, aleatoric, epistemic, lse, logpbar);
  }
  return {total, aleatoric, epistemic, lse, logpbar};
}

// Eqn 4 backward: the gradient of g_total . total + g_aleatoric . aleatoric + g_epistemic . epistemic
// with respect to logits, from the forward's saved lse and logpbar.
at::Tensor entropy_backward(const at::Tensor& g_total, const at::Tensor& g_aleatoric, const at::Tensor& g_epistemic,
                            const at::Tensor& logits, const at::Tensor& lse, const at::Tensor& logpbar) {
  check_logits(logits);
  const int64_t K = logits.size(0), B = logits.size(1), C = logits.size(2);
  const auto dtype = logits.scalar_type();
  check_like(g_total, "g_total", logits, "logits", dtype, {B});
  check_like(g_aleatoric, "g_aleatoric", logits, "logits", dtype, {B});
  check_like(g_epistemic, "g_epistemic", logits, "logits", dtype, {B});
  check_like(lse, "lse", logits, "logits", acc_dtype(dtype), {K, B});
  check_like(logpbar, "logpbar", logits, "logits", acc_dtype(dtype), {B, C});

  const at::Tensor grad_logits = at::empty_like(logits);
  if (on_cuda(logits)) {
#ifdef WITH_CUDA
    entropy_backward_cuda(g_total, g_aleatoric, g_epistemic, logits, lse, logpbar, grad_logits);
#endif
  } else {
    entropy_backward_cpu(g_total, g_aleatoric, g_epistemic, logits, lse, logpbar, grad_logits);
  }
  return grad_logits;
}

}  // namespace ltg

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  namespace py = pybind11;
  m.doc() = "Fused kernels of Longtail Guidance (see ltg.py for the pure-torch references).";
  m.def("has_cuda", [] {
#ifdef WITH_CUDA
    return true;
#else
    return false;
#endif
  }, "Whether the CUDA kernels were compiled in.");
  m.def("gaussian_path_step", &ltg::gaussian_path_step,
        "Eqns 11, 8, 7 fused on the path z_t = a_t x0 + b_t eps: (z_prev, eps_hat or None).", py::arg("z"),
        py::arg("eps"), py::arg("grad"), py::arg("a_t"), py::arg("b_t"), py::arg("a_prev"), py::arg("b_prev"),
        py::arg("w"), py::arg("write_eps"));
  m.def("entropy_forward", &ltg::entropy_forward,
        "Eqn 4 fused: logits [K, B, C] -> (total, aleatoric, epistemic, lse, logpbar).", py::arg("logits"));
  m.def("entropy_backward", &ltg::entropy_backward,
        "Eqn 4 backward: grad of the three signals w.r.t. logits.", py::arg("g_total"), py::arg("g_aleatoric"),
        py::arg("g_epistemic"), py::arg("logits"), py::arg("lse"), py::arg("logpbar"));
}
