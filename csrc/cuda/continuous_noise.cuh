// Host launcher of the continuous noising CUDA kernel (csrc/cuda/continuous_noise.cu).
//
// Torch-free: raw device pointers, sizes and a stream; included by the .cu file and
// by the torch binding (continuous_noise_binding.cpp), which a host compiler builds.
// Element pointers are void* of `Dtype`; alpha and sigma are in the compute type
// (float, double for kFloat64). The noise follows csrc/include/fastbound/continuous.h.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "continuous_common.cuh"

namespace fastbound {
namespace gpu {
namespace continuous {

// z = alpha_b (x + warm_std u) + sigma_b eps, eps, and x_warm (when not null); all (rows, cols) contiguous.
struct PerturbArgs {
  const void* x;
  const void* alpha;  // (rows,) compute type
  const void* sigma;  // (rows,) compute type
  void* z;
  void* eps;
  void* x_warm;  // or nullptr
  int64_t rows, cols;
  int law;  // continuous::kWarm*
  double warm_std;
  uint64_t seed, offset;
};
cudaError_t launch_perturb(const PerturbArgs& a, Dtype dtype, cudaStream_t stream);

}  // namespace continuous
}  // namespace gpu
}  // namespace fastbound
