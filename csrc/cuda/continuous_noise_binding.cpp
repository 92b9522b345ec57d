// Torch binding of the continuous noising CUDA kernel (csrc/cuda/continuous_noise.cu):
// `TORCH_LIBRARY_IMPL(fastbound, CUDA, m)` for continuous_perturb, with the CPU
// kernel's contract checks (common/continuous_checks.h). Built only with a CUDA torch.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <tuple>

#include "continuous_binding.h"
#include "continuous_noise.cuh"
#include "common/continuous_checks.h"

namespace fastbound {
namespace gpu {
namespace continuous {
namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor> perturb(const at::Tensor& x, const at::Tensor& alpha,
                                                       const at::Tensor& sigma, int64_t warm, double warm_std,
                                                       int64_t seed, int64_t offset, bool return_warm) {
  ::fastbound::continuous::check_perturb(x, alpha, sigma, warm);
  check_cuda(x, "continuous_perturb");
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor z = at::empty_like(x), eps = at::empty_like(x);
  at::Tensor x_warm = return_warm ? at::empty_like(x) : at::empty({0}, x.options());
  const PerturbArgs a{x.const_data_ptr(), alpha.const_data_ptr(), sigma.const_data_ptr(), z.mutable_data_ptr(),
                      eps.mutable_data_ptr(), return_warm ? x_warm.mutable_data_ptr() : nullptr, x.size(0),
                      x.size(1), static_cast<int>(warm), warm_std, static_cast<uint64_t>(seed),
                      static_cast<uint64_t>(offset)};
  C10_CUDA_CHECK(launch_perturb(a, dtype_of(x), c10::cuda::getCurrentCUDAStream()));
  return {z, eps, x_warm};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastbound, CUDA, m) { m.impl("continuous_perturb", &perturb); }

}  // namespace continuous
}  // namespace gpu
}  // namespace fastbound
