// Host launchers of the continuous loss and integration CUDA kernels
// (csrc/cuda/continuous_loss.cu).
//
// Torch-free: raw device pointers, sizes and a stream; included by the .cu file and
// by the torch binding (continuous_loss_binding.cpp), which a host compiler builds,
// so nothing here needs nvcc. Element pointers are void* of `Dtype`; per-row tensors
// are in the compute type (float, double for kFloat64) unless said otherwise. A
// regenerated eps follows csrc/include/fastbound/continuous.h.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "continuous_common.cuh"

namespace fastbound {
namespace gpu {
namespace continuous {

// Per row: sum_i (eps - eps_hat)^2, with eps (rows, cols) or, when null, regenerated
// from (seed, offset) and rounded to the element type.
struct RowsArgs {
  const void* eps_hat;
  const void* eps;  // or nullptr
  int64_t rows, cols;
  uint64_t seed, offset;
};

// loss[b] = 0.5 scale_b sum (compute type); grad = scale_b (eps_hat - eps) when not null.
cudaError_t launch_denoising_loss(const RowsArgs& a, const void* scale, void* loss, void* grad, Dtype dtype,
                                  cudaStream_t stream);

// S_b = weight_b (sum_b - baseline_b) (sums in float64), acc[index_b] += (S_b, S_b^2) serially
// in sample order. baseline and index may be null (index null: slot b); a slot outside
// [0, n_slots) is skipped (the Python layer reports it). workspace holds rows doubles.
struct IntegrateArgs {
  const double* weight;
  const double* baseline;
  const int64_t* index;
  double* acc;  // (n_slots, 2)
  int64_t n_slots;
  double* workspace;
};
cudaError_t launch_integrate_step(const RowsArgs& a, const IntegrateArgs& b, Dtype dtype, cudaStream_t stream);

}  // namespace continuous
}  // namespace gpu
}  // namespace fastbound
