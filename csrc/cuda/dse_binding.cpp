// Torch binding of the CUDA denoising score entropy kernels (csrc/cuda/dse.cu):
// `TORCH_LIBRARY_IMPL(fastbound, CUDA, m)` for dse_forward and
// dse_forward_inplace, mirroring csrc/cpu/dse.cpp. Built only with a CUDA torch.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <tuple>

#include "binding.h"
#include "fastbound/elementwise.h"
#include "losses.cuh"

namespace fastbound {
namespace gpu {
namespace {

// Computes the per-row loss and, when `grad` is given, writes the gradient,
// on the current stream of the scores' device.
void dse_rows(const at::Tensor& score, at::Tensor* grad, const at::Tensor& sigma, const at::Tensor& x_t,
              const at::Tensor& x0, const at::Tensor& row_scale, int64_t graph, int64_t ignore_index,
              at::Tensor& loss) {
  TORCH_CHECK(graph == kGraphAbsorb || graph == kGraphUniform, "fastbound: unknown graph code ", graph);
  const c10::cuda::CUDAGuard device_guard(score.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, score.scalar_type(), "dse_cuda", [&] {
    using cuda_t = cuda_scalar_t<scalar_t>;
    const auto batch = make_batch<scalar_t>(score, grad, x_t, x0, row_scale, loss);
    C10_CUDA_CHECK(launch_dse<cuda_t>(batch, sigma.const_data_ptr<acc_type<cuda_t>>(), graph, ignore_index, stream));
  });
}

std::tuple<at::Tensor, at::Tensor> dse_forward(const at::Tensor& score, const at::Tensor& sigma,
                                               const at::Tensor& x_t, const at::Tensor& x0,
                                               const at::Tensor& row_scale, int64_t graph, int64_t ignore_index,
                                               bool need_grad) {
  check_cuda_loss_inputs(score, sigma, x_t, x0, row_scale, /*inplace=*/false);
  at::Tensor loss = at::empty({score.size(0)}, sigma.options());
  at::Tensor grad = need_grad ? at::empty(score.sizes(), score.options()) : at::empty({0}, score.options());
  dse_rows(score, need_grad ? &grad : nullptr, sigma, x_t, x0, row_scale, graph, ignore_index, loss);
  return {loss, grad};
}

at::Tensor dse_forward_inplace(at::Tensor& score, const at::Tensor& sigma, const at::Tensor& x_t,
                               const at::Tensor& x0, const at::Tensor& row_scale, int64_t graph,
                               int64_t ignore_index) {
  check_cuda_loss_inputs(score, sigma, x_t, x0, row_scale, /*inplace=*/true);
  at::Tensor loss = at::empty({score.size(0)}, sigma.options());
  dse_rows(score, &score, sigma, x_t, x0, row_scale, graph, ignore_index, loss);
  return loss;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastbound, CUDA, m) {
  m.impl("dse_forward", &dse_forward);
  m.impl("dse_forward_inplace", &dse_forward_inplace);
}

}  // namespace gpu
}  // namespace fastbound
