// The value checks of the public losses on CPU tensors (check_ids.cpp), for C++ callers.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <optional>

namespace fastbound {
namespace cpu {

// x_t, x0 contiguous (N,) int64; sigma (when given) contiguous (N,) float32 / float64.
// Raises a ValueError naming the first bad id, or sigma not positive and finite.
void check_loss_ids_cpu(const at::Tensor& x_t, const at::Tensor& x0, const std::optional<at::Tensor>& sigma,
                        int64_t n_cols, int64_t loss, int64_t graph, int64_t mask_id, int64_t ignore_index);

}  // namespace cpu
}  // namespace fastbound
