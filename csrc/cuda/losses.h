// Host launcher of the fused-loss CUDA kernels (csrc/cuda/losses.cu), and the
// accumulation type of the CUDA row code.
//
// Torch-free: raw device pointers, sizes, row strides and a stream. Included by
// the .cu files and by the torch binding (losses_binding.cpp), which a host
// C++ compiler builds, so nothing here may need nvcc.
//
// Element types: float, double, __half, __nv_bfloat16. Accumulation is in
// float (double for double), the dtype of sigma, row_scale and loss.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime_api.h>

#include <cstdint>

#include "fastbound/elementwise.h"

namespace fastbound {
namespace gpu {

// Calls M(type) for each element type of the CUDA kernels (explicit instantiations).
#define FB_FOR_EACH_CUDA_FLOAT(M) M(float) M(double) M(__half) M(__nv_bfloat16)

template <typename scalar_t>
struct AccType {
  using type = float;
};
template <>
struct AccType<double> {
  using type = double;
};
template <typename scalar_t>
using acc_type = typename AccType<scalar_t>::type;

// A batch of loss rows: scores (n_rows, n_cols) with unit column stride, the
// per-row ids, noise and scale, and the outputs. `grad` is nullptr (loss
// only), a separate (n_rows, n_cols) buffer, or `score` itself (in place: every
// score a kernel needs is read before its row is overwritten).
template <typename scalar_t>
struct LossBatch {
  const scalar_t* score;
  int64_t score_stride;  // elements between consecutive rows
  scalar_t* grad;
  int64_t grad_stride;
  const int64_t* x_t;                   // (n_rows,)
  const int64_t* x0;                    // (n_rows,)
  const acc_type<scalar_t>* sigma;      // (n_rows,) total noise, or nullptr (the DCE has none)
  const acc_type<scalar_t>* row_scale;  // (n_rows,) weight (and 1/count for "mean")
  acc_type<scalar_t>* loss;             // (n_rows,) output
  int64_t n_rows;
  int64_t n_cols;
};

// Writes loss[i] = row_scale[i] * l_i and, when grad is set, grad =
// row_scale[i] * d l_i / d score, for the loss of `spec`:
//   * DSE, absorbing graph (SEDD): rows with x_t == mask_id contribute, the
//     mask column is left out of the sums and gets a zero gradient;
//   * DSE, uniform graph (SEDD): every row contributes, column x_t left out;
//   * DCE (MDLM): rows with x_t == mask_id give
//     row_scale * (logsumexp_{y != mask_id} s_y - s_{x0}) and
//     row_scale * (softmax(s) - onehot(x0)), the mask column (when
//     mask_id < n_cols) left out of the softmax with a zero gradient.
// Other rows, and rows whose x0 is ignore_index, get loss 0 and a zero
// gradient row. A row with an id out of range (or x0 == mask_id) gets a NaN
// loss and a NaN gradient row (the Python layer reports such ids); the rules
// are those of loss_row_kernels.cuh. Returns cudaErrorInvalidValue for an
// unknown loss or graph code, else the launch status.
template <typename scalar_t>
cudaError_t launch_loss(const LossBatch<scalar_t>& batch, const LossSpec& spec, cudaStream_t stream);

}  // namespace gpu
}  // namespace fastbound
