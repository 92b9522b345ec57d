// The argument contract of `scale_rows_` (schema in csrc/ops.cpp), shared by the
// CPU kernel (csrc/cpu/scale_rows.cpp) and the CUDA binding
// (csrc/cuda/scale_rows_binding.cpp).
//
// scale_rows_ multiplies each row i of a fused loss's saved gradient (N, V) by
// factor[i], in place, and leaves alone the rows whose gradient the loss wrote
// as zeros (x0[i] == ignore_index; x_t[i] != mask_id when mask_id >= 0) and the
// rows whose factor is exactly 1. Zero rows are skipped only where the factor
// is finite (there they equal `0 * factor`; 0 * inf is NaN and is written), so the result is `grad * factor[:, None]` computed in
// the accumulation dtype and rounded once, at the cost of the rows that
// contribute (the masked fraction of the absorbing DSE and the DCE).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <optional>

#include "common/checks.h"

namespace fastbound {

// grad (N, V) with unit column stride and rows that do not share memory;
// factor (N,) of the accumulation dtype, any stride; x_t and x0 absent or
// contiguous (N,) int64; all on grad's device.
inline void check_scale_rows_inputs(const at::Tensor& grad, const at::Tensor& factor,
                                    const std::optional<at::Tensor>& x_t, const std::optional<at::Tensor>& x0) {
  TORCH_CHECK_VALUE(grad.dim() == 2, "fastbound.scale_rows_: grad must be (N, V), got ", grad.sizes());
  const int64_t n = grad.size(0), v = grad.size(1);
  TORCH_CHECK_VALUE(v <= 1 || grad.stride(1) == 1, "fastbound.scale_rows_: grad must have unit stride in its last dimension");
  TORCH_CHECK_VALUE(n <= 1 || v == 0 || grad.stride(0) >= v,
                    "fastbound.scale_rows_: grad has rows that overlap in memory (row stride ", grad.stride(0), " < ", v,
                    " columns); the in-place op would scale them twice");
  const auto acc = grad.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  TORCH_CHECK_VALUE(factor.dim() == 1 && factor.size(0) == n && factor.scalar_type() == acc,
                    "fastbound.scale_rows_: factor must be (N,) = (", n, ",) of dtype ", acc, ", got ", factor.sizes(),
                    " of dtype ", factor.scalar_type());
  check_same_device("scale_rows_", grad, {&factor});
  for (const std::optional<at::Tensor>* ids : {&x_t, &x0}) {
    if (!ids->has_value()) continue;
    const at::Tensor& t = **ids;
    TORCH_CHECK_VALUE(t.dim() == 1 && t.size(0) == n && t.is_contiguous() && t.scalar_type() == at::kLong,
                      "fastbound.scale_rows_: x_t and x0 must be contiguous (N,) int64");
    check_same_device("scale_rows_", grad, {&t});
  }
}

}  // namespace fastbound
