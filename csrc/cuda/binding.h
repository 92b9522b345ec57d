// Plumbing shared by the CUDA loss bindings (dse_binding.cpp, dce_binding.cpp):
// the input checks, the torch -> CUDA element type mapping and the packing of
// tensors into the torch-free `LossBatch` the kernels take (losses.cuh).
// Built only against a CUDA torch.
#pragma once

#include <ATen/MemoryOverlap.h>
#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>

#include <initializer_list>

#include "cpu/loss_rows.h"  // check_loss_inputs: the same internal contract as the CPU kernels
#include "losses.cuh"

namespace fastbound {
namespace gpu {

// The CUDA element type with the same bits as a torch scalar type.
template <typename scalar_t>
struct CudaScalar {
  using type = scalar_t;
};
template <>
struct CudaScalar<c10::Half> {
  using type = __half;
};
template <>
struct CudaScalar<c10::BFloat16> {
  using type = __nv_bfloat16;
};
template <typename scalar_t>
using cuda_scalar_t = typename CudaScalar<scalar_t>::type;

static_assert(sizeof(c10::Half) == sizeof(__half), "c10::Half and __half must have the same layout");
static_assert(sizeof(c10::BFloat16) == sizeof(__nv_bfloat16),
              "c10::BFloat16 and __nv_bfloat16 must have the same layout");

// The CPU kernels' contract (shapes, dtypes, no shared rows in place), plus:
// everything on one CUDA device.
inline void check_cuda_loss_inputs(const at::Tensor& score, const at::Tensor& sigma, const at::Tensor& x_t,
                                   const at::Tensor& x0, const at::Tensor& row_scale, bool inplace) {
  cpu::check_loss_inputs(score, sigma, x_t, x0, row_scale, inplace);
  TORCH_CHECK(score.is_cuda(), "fastbound: the CUDA kernels need CUDA scores, got ", score.device());
  for (const at::Tensor* t : {&sigma, &x_t, &x0, &row_scale}) {
    TORCH_CHECK(t->device() == score.device(), "fastbound: every input must be on the scores' device ",
                score.device(), ", got one on ", t->device());
  }
}

// Packs the flattened tensors (already checked) into a kernel batch. `grad` is
// nullptr (loss only), a fresh (N, V) tensor, or &score (in place).
template <typename scalar_t>
LossBatch<cuda_scalar_t<scalar_t>> make_batch(const at::Tensor& score, at::Tensor* grad, const at::Tensor& x_t,
                                              const at::Tensor& x0, const at::Tensor& row_scale,
                                              at::Tensor& loss) {
  using cuda_t = cuda_scalar_t<scalar_t>;
  using acc_t = acc_type<cuda_t>;
  LossBatch<cuda_t> batch;
  batch.score = reinterpret_cast<const cuda_t*>(score.const_data_ptr<scalar_t>());
  batch.score_stride = score.stride(0);
  batch.grad = grad != nullptr ? reinterpret_cast<cuda_t*>(grad->mutable_data_ptr<scalar_t>()) : nullptr;
  batch.grad_stride = grad != nullptr ? grad->stride(0) : 0;
  batch.x_t = x_t.const_data_ptr<int64_t>();
  batch.x0 = x0.const_data_ptr<int64_t>();
  batch.row_scale = row_scale.const_data_ptr<acc_t>();
  batch.loss = loss.mutable_data_ptr<acc_t>();
  batch.n_rows = score.size(0);
  batch.n_cols = score.size(1);
  return batch;
}

}  // namespace gpu
}  // namespace fastbound
