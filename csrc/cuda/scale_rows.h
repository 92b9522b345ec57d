// Host launcher of `scale_rows_` on CUDA (csrc/cuda/scale_rows.cu; contract:
// csrc/common/scale_rows.h): the backward of a fused loss multiplies each
// contributing row of the saved gradient by its upstream factor, in place.
//
// Torch-free: raw device pointers, sizes, strides and a stream, so the torch
// binding (scale_rows_binding.cpp) builds with the host compiler.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "losses.h"

namespace fastbound {
namespace gpu {

// grad (n_rows, n_cols) with unit column stride; factor (n_rows,) at stride
// `factor_stride`; x_t and x0 (n_rows,) or nullptr. Row i is left alone when
// factor[i] == 1, x0[i] == ignore_index (x0 given), or x_t[i] != mask_id
// (x_t given and mask_id >= 0); otherwise grad[i, :] *= factor[i], computed in
// the accumulation type and rounded once.
template <typename scalar_t>
struct ScaleRowsBatch {
  scalar_t* grad;
  int64_t grad_stride;
  const acc_type<scalar_t>* factor;
  int64_t factor_stride;
  const int64_t* x_t;
  const int64_t* x0;
  int64_t mask_id;
  int64_t ignore_index;
  int64_t n_rows;
  int64_t n_cols;
};

// Launches on `stream`; returns the launch status.
template <typename scalar_t>
cudaError_t launch_scale_rows(const ScaleRowsBatch<scalar_t>& batch, cudaStream_t stream);

}  // namespace gpu
}  // namespace fastbound
