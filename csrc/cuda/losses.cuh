// Host launchers of the fused-loss CUDA kernels (csrc/cuda/dse.cu, dce.cu).
//
// Torch-free: raw device pointers, sizes, row strides and a stream. Included by
// the .cu files and by the torch bindings (csrc/cuda/*_binding.cpp), which a
// host C++ compiler builds, so nothing here may need nvcc.
//
// Element types: float, double, __half, __nv_bfloat16. Accumulation is in
// float (double for double), the dtype of sigma, row_scale and loss.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime_api.h>

#include <cstdint>

namespace fastbound {
namespace gpu {

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
// per-row ids and scale, and the outputs. `grad` is nullptr (loss only), a
// separate (n_rows, n_cols) buffer, or `score` itself (in place: every score a
// kernel needs is read before its row is overwritten).
template <typename scalar_t>
struct LossBatch {
  const scalar_t* score;
  int64_t score_stride;  // elements between consecutive rows
  scalar_t* grad;
  int64_t grad_stride;
  const int64_t* x_t;                   // (n_rows,)
  const int64_t* x0;                    // (n_rows,)
  const acc_type<scalar_t>* row_scale;  // (n_rows,) weight (and 1/count for "mean")
  acc_type<scalar_t>* loss;             // (n_rows,) output
  int64_t n_rows;
  int64_t n_cols;
};

// Denoising score entropy (SEDD). `graph`: kGraphAbsorb or kGraphUniform
// (fastbound/elementwise.h). Writes loss[i] = row_scale[i] * l_i and, when
// grad is set, grad = row_scale[i] * d l_i / d score. Rows whose x0 is
// ignore_index (and, for the absorbing graph, rows whose x_t is not the mask
// V-1) get loss 0 and a zero gradient row. A row with an id out of range gets
// a NaN loss and a NaN gradient row (the Python layer reports such ids).
// Returns cudaErrorInvalidValue for an unknown graph, else the launch status.
template <typename scalar_t>
cudaError_t launch_dse(const LossBatch<scalar_t>& batch, const acc_type<scalar_t>* sigma, int64_t graph,
                       int64_t ignore_index, cudaStream_t stream);

// Denoising cross-entropy (MDLM): at rows with x_t == mask_id,
// loss = row_scale * (logsumexp_{y != mask_id} s_y - s_{x0}) and
// grad = row_scale * (softmax(s) - onehot(x0)), with the mask column (when
// mask_id < n_cols) left out of the softmax and given a zero gradient. Other
// rows, and rows whose x0 is ignore_index, get loss 0 and a zero gradient row;
// an x0 out of range or equal to mask_id gives a NaN loss and gradient row.
template <typename scalar_t>
cudaError_t launch_dce(const LossBatch<scalar_t>& batch, int64_t mask_id, int64_t ignore_index,
                       cudaStream_t stream);

}  // namespace gpu
}  // namespace fastbound
