// The contract checks of the continuous ops (schemas in csrc/ops.cpp), shared by
// the CPU kernels (csrc/cpu/continuous_*.cpp) and the CUDA bindings
// (csrc/cuda/continuous_*_binding.cpp). Unlike continuous.h this header needs ATen;
// the .cu files never include it.
//
// fastbound.continuous always passes tensors that satisfy these; they guard
// direct calls of the raw ops.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <optional>

#include "fastbound/continuous.h"

namespace fastbound {
namespace continuous {

inline at::ScalarType compute_type(const at::Tensor& t) {
  return t.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

inline void check_rows(const char* op, const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.dim() == 2 && t.is_contiguous(), "fastbound.", op, ": ", name, " must be contiguous (B, d)");
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble || t.scalar_type() == at::kHalf ||
                  t.scalar_type() == at::kBFloat16,
              "fastbound.", op, ": ", name, " must be float32, float64, float16 or bfloat16");
  TORCH_CHECK(t.numel() <= INT64_C(0x7FFFFFFF), "fastbound.", op, ": at most 2^31 - 1 elements");
}

inline void check_per_row(const char* op, const at::Tensor& rows, const at::Tensor& t, at::ScalarType dtype,
                          const char* name) {
  TORCH_CHECK(t.dim() == 1 && t.size(0) == rows.size(0) && t.is_contiguous() && t.scalar_type() == dtype,
              "fastbound.", op, ": ", name, " must be contiguous (B,) ", dtype);
  TORCH_CHECK(t.device() == rows.device(), "fastbound.", op, ": ", name, " must be on ", rows.device());
}

inline void check_perturb(const at::Tensor& x, const at::Tensor& alpha, const at::Tensor& sigma, int64_t warm) {
  check_rows("continuous_perturb", x, "x");
  check_per_row("continuous_perturb", x, alpha, compute_type(x), "alpha");
  check_per_row("continuous_perturb", x, sigma, compute_type(x), "sigma");
  TORCH_CHECK(warm >= kWarmNone && warm <= kWarmUniform, "fastbound.continuous_perturb: unknown warm law code ",
              warm);
}

inline void check_eps(const char* op, const at::Tensor& eps_hat, const std::optional<at::Tensor>& eps) {
  check_rows(op, eps_hat, "eps_hat");
  if (eps.has_value()) {
    TORCH_CHECK(eps->sizes() == eps_hat.sizes() && eps->is_contiguous() &&
                    eps->scalar_type() == eps_hat.scalar_type() && eps->device() == eps_hat.device(),
                "fastbound.", op, ": eps must be contiguous with eps_hat's shape, dtype and device");
  }
}

inline void check_integrate(const at::Tensor& eps_hat, const std::optional<at::Tensor>& eps, const at::Tensor& acc,
                            const at::Tensor& weight, const std::optional<at::Tensor>& baseline,
                            const std::optional<at::Tensor>& index) {
  const char* op = "continuous_integrate_step";
  check_eps(op, eps_hat, eps);
  TORCH_CHECK(acc.dim() == 2 && acc.size(1) == 2 && acc.is_contiguous() && acc.scalar_type() == at::kDouble &&
                  acc.device() == eps_hat.device(),
              "fastbound.continuous_integrate_step: acc must be a contiguous (n_slots, 2) float64 tensor on ",
              eps_hat.device());
  check_per_row(op, eps_hat, weight, at::kDouble, "weight");
  if (baseline.has_value()) check_per_row(op, eps_hat, *baseline, at::kDouble, "baseline");
  if (index.has_value()) {
    check_per_row(op, eps_hat, *index, at::kLong, "index");
  } else {
    TORCH_CHECK(acc.size(0) == eps_hat.size(0),
                "fastbound.continuous_integrate_step: without index, acc needs one row per sample");
  }
}

}  // namespace continuous
}  // namespace fastbound
