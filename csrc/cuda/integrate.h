// Host launcher of the likelihood integration step's CUDA kernels
// (csrc/cuda/integrate.cu). Torch-free; the torch binding is integrate_binding.cpp.
//
// For every sequence b of the (B, L, V) denoiser output
//   S_b = weight[b] * sum_i loss(out[b, i], sigma[b], x_t[b, i], x0[b, i])
// is added, with S_b^2, to the accumulator row of b: the loss of a LossSpec
// (DSE, absorbing or uniform graph, or DCE), evaluated by the loss kernels'
// row functors (loss_row_kernels.cuh) without a gradient.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "fastbound/elementwise.h"

namespace fastbound {
namespace gpu {

template <typename scalar_t>
struct IntegrateBatch {
  const scalar_t* out;  // (B, L, V) scores, unit stride in V
  int64_t stride_b, stride_l;
  int64_t n_seq, length, n_cols;
  const int64_t* x_t;     // (B, L) contiguous
  const int64_t* x0;      // (B, L) contiguous
  const double* sigma;    // (B,)
  const double* weight;   // (B,)
  // The sequences in accumulator-row order: order[j] is the j-th sequence of
  // a stable sort by accumulator row and slot[j] its row (both nullptr when
  // sequence b uses row b). A slot outside [0, n_slots) is skipped.
  const int64_t* order;
  const int64_t* slot;
  double* acc;  // (n_slots, 2)
  int64_t n_slots;
  double* partial;  // integrate_workspace_doubles(...) doubles of device scratch memory
};

int64_t integrate_workspace_doubles(int64_t n_seq, int64_t length, int64_t n_cols);

// Adds (S_b, S_b^2) to acc[slot of b] for every sequence, on `stream`: sequences
// sharing a row are added in sequence order, so the result is deterministic.
// Returns cudaErrorInvalidValue for an unknown loss or graph code, else the
// launch status.
template <typename scalar_t>
cudaError_t launch_integrate(const IntegrateBatch<scalar_t>& batch, const LossSpec& spec, cudaStream_t stream);

}  // namespace gpu
}  // namespace fastbound
