// Torch binding of the CUDA denoising cross-entropy kernels (csrc/cuda/dce.cu):
// `TORCH_LIBRARY_IMPL(fastbound, CUDA, m)` for dce_forward and
// dce_forward_inplace, mirroring csrc/cpu/dce.cpp. Built only with a CUDA torch.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <tuple>

#include "binding.h"
#include "losses.cuh"

namespace fastbound {
namespace gpu {
namespace {

void dce_rows(const at::Tensor& logits, at::Tensor* grad, const at::Tensor& x_t, const at::Tensor& x0,
              const at::Tensor& row_scale, int64_t mask_id, int64_t ignore_index, at::Tensor& loss) {
  const c10::cuda::CUDAGuard device_guard(logits.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "dce_cuda", [&] {
    const auto batch = make_batch<scalar_t>(logits, grad, x_t, x0, row_scale, loss);
    C10_CUDA_CHECK(launch_dce<cuda_scalar_t<scalar_t>>(batch, mask_id, ignore_index, stream));
  });
}

std::tuple<at::Tensor, at::Tensor> dce_forward(const at::Tensor& logits, const at::Tensor& x_t,
                                               const at::Tensor& x0, const at::Tensor& row_scale,
                                               int64_t mask_id, int64_t ignore_index, bool need_grad) {
  // DCE has no sigma: the row scale stands in for it in the shared check.
  check_cuda_loss_inputs(logits, row_scale, x_t, x0, row_scale, /*inplace=*/false);
  at::Tensor loss = at::empty({logits.size(0)}, row_scale.options());
  at::Tensor grad = need_grad ? at::empty(logits.sizes(), logits.options()) : at::empty({0}, logits.options());
  dce_rows(logits, need_grad ? &grad : nullptr, x_t, x0, row_scale, mask_id, ignore_index, loss);
  return {loss, grad};
}

at::Tensor dce_forward_inplace(at::Tensor& logits, const at::Tensor& x_t, const at::Tensor& x0,
                               const at::Tensor& row_scale, int64_t mask_id, int64_t ignore_index) {
  check_cuda_loss_inputs(logits, row_scale, x_t, x0, row_scale, /*inplace=*/true);
  at::Tensor loss = at::empty({logits.size(0)}, row_scale.options());
  dce_rows(logits, &logits, x_t, x0, row_scale, mask_id, ignore_index, loss);
  return loss;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastbound, CUDA, m) {
  m.impl("dce_forward", &dce_forward);
  m.impl("dce_forward_inplace", &dce_forward_inplace);
}

}  // namespace gpu
}  // namespace fastbound
