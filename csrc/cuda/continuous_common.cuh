// Shared by the continuous CUDA kernels (continuous_noise.cu, continuous_loss.cu) and
// their torch bindings: the element type code and, for nvcc, the block size and the
// dispatch from it to a kernel's template argument. Torch-free.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#endif

namespace fastbound {
namespace gpu {
namespace continuous {

enum class Dtype { kFloat32, kFloat64, kFloat16, kBFloat16 };

#if defined(__CUDACC__)
constexpr int kThreads = 256;

// Calls fn(scalar_t{}) for the element type of dtype; returns the launch status.
template <typename Fn>
inline cudaError_t dispatch(Dtype dtype, Fn&& fn) {
  switch (dtype) {
    case Dtype::kFloat32: fn(float{}); break;
    case Dtype::kFloat64: fn(double{}); break;
    case Dtype::kFloat16: fn(__half{}); break;
    case Dtype::kBFloat16: fn(__nv_bfloat16{}); break;
    default: return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}
#endif

}  // namespace continuous
}  // namespace gpu
}  // namespace fastbound
