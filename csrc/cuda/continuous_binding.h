// Helpers of the continuous CUDA kernels' torch bindings (continuous_noise_binding.cpp,
// continuous_loss_binding.cpp): the element type code of a tensor, the device check.
#pragma once

#include <ATen/core/Tensor.h>

#include "continuous_common.cuh"

namespace fastbound {
namespace gpu {
namespace continuous {

inline Dtype dtype_of(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return Dtype::kFloat32;
    case at::kDouble: return Dtype::kFloat64;
    case at::kHalf: return Dtype::kFloat16;
    case at::kBFloat16: return Dtype::kBFloat16;
    default: TORCH_CHECK_TYPE(false, "fastbound.continuous: unsupported dtype ", t.scalar_type());
  }
}

inline void check_cuda(const at::Tensor& t, const char* op) {
  TORCH_CHECK(t.is_cuda(), "fastbound.", op, ": the CUDA kernel needs CUDA tensors, got ", t.device());
}

}  // namespace continuous
}  // namespace gpu
}  // namespace fastbound
