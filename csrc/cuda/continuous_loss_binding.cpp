// Torch binding of the continuous loss CUDA kernels (csrc/cuda/continuous_loss.cu):
// `TORCH_LIBRARY_IMPL(fastbound, CUDA, m)` for continuous_denoising_loss and
// continuous_integrate_step, with the CPU kernels' contract checks
// (common/continuous_checks.h). Built only with a CUDA torch.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

#include "continuous_binding.h"
#include "continuous_loss.cuh"
#include "common/continuous_checks.h"

namespace fastbound {
namespace gpu {
namespace continuous {
namespace {

RowsArgs rows_args(const at::Tensor& eps_hat, const std::optional<at::Tensor>& eps, int64_t seed, int64_t offset) {
  return RowsArgs{eps_hat.const_data_ptr(), eps.has_value() ? eps->const_data_ptr() : nullptr, eps_hat.size(0),
                  eps_hat.size(1), static_cast<uint64_t>(seed), static_cast<uint64_t>(offset)};
}

std::tuple<at::Tensor, at::Tensor> denoising_loss(const at::Tensor& eps_hat, const std::optional<at::Tensor>& eps,
                                                  const at::Tensor& scale, int64_t seed, int64_t offset,
                                                  bool need_grad) {
  ::fastbound::continuous::check_eps("continuous_denoising_loss", eps_hat, eps);
  ::fastbound::continuous::check_per_row("continuous_denoising_loss", eps_hat, scale,
                                         ::fastbound::continuous::compute_type(eps_hat), "scale");
  check_cuda(eps_hat, "continuous_denoising_loss");
  const c10::cuda::CUDAGuard guard(eps_hat.device());
  at::Tensor loss = at::empty({eps_hat.size(0)}, scale.options());
  at::Tensor grad = need_grad ? at::empty_like(eps_hat) : at::empty({0}, eps_hat.options());
  C10_CUDA_CHECK(launch_denoising_loss(rows_args(eps_hat, eps, seed, offset), scale.const_data_ptr(),
                                       loss.mutable_data_ptr(), need_grad ? grad.mutable_data_ptr() : nullptr,
                                       dtype_of(eps_hat), c10::cuda::getCurrentCUDAStream()));
  return {loss, grad};
}

void integrate_step(const at::Tensor& eps_hat, const std::optional<at::Tensor>& eps, at::Tensor& acc,
                    const at::Tensor& weight, const std::optional<at::Tensor>& baseline,
                    const std::optional<at::Tensor>& index, int64_t seed, int64_t offset) {
  ::fastbound::continuous::check_integrate(eps_hat, eps, acc, weight, baseline, index);
  check_cuda(eps_hat, "continuous_integrate_step");
  const c10::cuda::CUDAGuard guard(eps_hat.device());
  at::Tensor workspace = at::empty({eps_hat.size(0)}, acc.options());
  const IntegrateArgs b{weight.const_data_ptr<double>(),
                        baseline.has_value() ? baseline->const_data_ptr<double>() : nullptr,
                        index.has_value() ? index->const_data_ptr<int64_t>() : nullptr, acc.mutable_data_ptr<double>(),
                        acc.size(0), workspace.mutable_data_ptr<double>()};
  C10_CUDA_CHECK(launch_integrate_step(rows_args(eps_hat, eps, seed, offset), b, dtype_of(eps_hat),
                                       c10::cuda::getCurrentCUDAStream()));
}

}  // namespace

TORCH_LIBRARY_IMPL(fastbound, CUDA, m) {
  m.impl("continuous_denoising_loss", &denoising_loss);
  m.impl("continuous_integrate_step", &integrate_step);
}

}  // namespace continuous
}  // namespace gpu
}  // namespace fastbound
