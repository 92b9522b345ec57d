// Likelihood integration step, CUDA kernels: the torch-free interface.
//
// `integrate_step` launches, on `stream`, the kernels that compute for every
// sequence b of the (B, L, V) denoiser output
//   S_b = weight[b] * sum_i loss(out[b, i], sigma[b], x_t[b, i], x0[b, i])
// and add (S_b, S_b^2) to acc[index[b]] (index may be null: index[b] = b).
// The loss is the DCE (MDLM) or the DSE (SEDD, absorbing or uniform graph),
// with the formulas of `fastbound/elementwise.h`. The torch binding is
// `integrate_binding.cpp`.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace fastbound {
namespace cuda {

enum class Dtype { kFloat32, kFloat64, kFloat16, kBFloat16 };

struct IntegrateProblem {
  const void* out;           // (B, L, V) scores, unit stride in V
  int64_t stride_b, stride_l;
  int64_t n_seq, length, n_cols;
  const int64_t* x_t;        // (B, L) contiguous
  const int64_t* x0;         // (B, L) contiguous
  const double* sigma;       // (B,)
  const double* weight;      // (B,)
  const int64_t* index;      // (B,) accumulator row per sequence, or null
  double* acc;               // (n_slots, 2)
  int64_t n_slots;
  double* workspace;         // integrate_workspace_doubles(...) doubles
  int loss, graph;           // kLossDse / kLossDce, kGraphAbsorb / kGraphUniform
  int64_t mask_id, ignore_index;
};

// Doubles of device scratch memory the launch needs.
int64_t integrate_workspace_doubles(int64_t n_seq, int64_t length, int64_t n_cols);

cudaError_t integrate_step(const IntegrateProblem& problem, Dtype dtype, cudaStream_t stream);

}  // namespace cuda
}  // namespace fastbound
