// Torch binding of the CUDA integration step (csrc/cuda/integrate.cu):
// `TORCH_LIBRARY_IMPL(fastbound, CUDA, m)` for integrate_step, with the
// contract checks of csrc/common/checks.h (as csrc/cpu/integrate.cpp). It
// sorts the accumulator rows (stably, so sequences sharing a row are added in
// sequence order), allocates the scratch memory and launches on the current
// stream. Built only with a CUDA torch.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/sort.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

#include "binding.h"
#include "common/checks.h"
#include "integrate.h"

namespace fastbound {
namespace gpu {
namespace {

void integrate_step(const at::Tensor& out, const at::Tensor& x_t, const at::Tensor& x0, const at::Tensor& sigma,
                    const at::Tensor& weight, at::Tensor& acc, const std::optional<at::Tensor>& index, int64_t loss,
                    int64_t graph, int64_t mask_id, int64_t ignore_index) {
  const LossSpec spec{loss, graph, mask_id, ignore_index};
  check_integrate_inputs(out, x_t, x0, sigma, weight, acc, index, spec);
  const c10::cuda::CUDAGuard device_guard(out.device());
  const int64_t n_seq = out.size(0), length = out.size(1), n_cols = out.size(2);
  at::Tensor slot, order;
  if (index.has_value()) std::tie(slot, order) = at::sort(*index, /*stable=*/true);
  at::Tensor partial = at::empty({integrate_workspace_doubles(n_seq, length, n_cols)}, acc.options());
  FB_DISPATCH_CUDA_FLOATS(out.scalar_type(), "fastbound_integrate_step_cuda", [&] {
    IntegrateBatch<cuda_t> p{};
    p.out = cuda_data<cuda_t>(out);
    p.stride_b = out.stride(0);
    p.stride_l = out.stride(1);
    p.n_seq = n_seq;
    p.length = length;
    p.n_cols = n_cols;
    p.x_t = x_t.const_data_ptr<int64_t>();
    p.x0 = x0.const_data_ptr<int64_t>();
    p.sigma = sigma.const_data_ptr<double>();
    p.weight = weight.const_data_ptr<double>();
    p.order = index.has_value() ? order.const_data_ptr<int64_t>() : nullptr;
    p.slot = index.has_value() ? slot.const_data_ptr<int64_t>() : nullptr;
    p.acc = acc.mutable_data_ptr<double>();
    p.n_slots = acc.size(0);
    p.partial = partial.mutable_data_ptr<double>();
    C10_CUDA_CHECK(launch_integrate<cuda_t>(p, spec, c10::cuda::getCurrentCUDAStream()));
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(fastbound, CUDA, m) { m.impl("integrate_step", &integrate_step); }

}  // namespace gpu
}  // namespace fastbound
