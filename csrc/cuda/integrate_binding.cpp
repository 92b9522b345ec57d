// Torch binding of the CUDA integration step (built only against a CUDA torch).
// Checks what the Python layer (`fastbound/integrate.py`) passes, allocates the
// scratch memory and launches `fastbound::cuda::integrate_step` on the current stream.
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAStream.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <optional>

#include "integrate.h"

namespace fastbound {
namespace cuda {
namespace {

Dtype dtype_of(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat:
      return Dtype::kFloat32;
    case at::kDouble:
      return Dtype::kFloat64;
    case at::kHalf:
      return Dtype::kFloat16;
    case at::kBFloat16:
      return Dtype::kBFloat16;
    default:
      TORCH_CHECK(false, "fastbound: integrate_step does not support scores of dtype ", t.scalar_type());
  }
}

void integrate_step_cuda(const at::Tensor& out, const at::Tensor& x_t, const at::Tensor& x0,
                         const at::Tensor& sigma, const at::Tensor& weight, at::Tensor& acc,
                         const std::optional<at::Tensor>& index, int64_t loss, int64_t graph,
                         int64_t mask_id, int64_t ignore_index) {
  TORCH_CHECK(out.dim() == 3, "fastbound: out must be (B, L, V), got ", out.sizes());
  TORCH_CHECK(out.size(2) <= 1 || out.stride(2) == 1, "fastbound: out must have unit stride in its last dimension");
  const int64_t n_seq = out.size(0), length = out.size(1), n_cols = out.size(2);
  for (const auto* t : {&x_t, &x0}) {
    TORCH_CHECK(t->dim() == 2 && t->size(0) == n_seq && t->size(1) == length && t->is_contiguous() &&
                    t->scalar_type() == at::kLong && t->device() == out.device(),
                "fastbound: x_t and x0 must be contiguous (B, L) int64 on the scores' device");
  }
  for (const auto* t : {&sigma, &weight}) {
    TORCH_CHECK(t->dim() == 1 && t->size(0) == n_seq && t->is_contiguous() && t->scalar_type() == at::kDouble &&
                    t->device() == out.device(),
                "fastbound: sigma and weight must be contiguous (B,) float64 on the scores' device");
  }
  TORCH_CHECK(acc.dim() == 2 && acc.size(1) == 2 && acc.is_contiguous() && acc.scalar_type() == at::kDouble &&
                  acc.device() == out.device(),
              "fastbound: acc must be a contiguous (S, 2) float64 tensor on the scores' device");
  if (index.has_value()) {
    TORCH_CHECK(index->dim() == 1 && index->size(0) == n_seq && index->is_contiguous() &&
                    index->scalar_type() == at::kLong && index->device() == out.device(),
                "fastbound: index must be contiguous (B,) int64 on the scores' device");
  } else {
    TORCH_CHECK(acc.size(0) == n_seq, "fastbound: without index, acc must have one row per sequence");
  }
  TORCH_CHECK(loss == 0 || loss == 1, "fastbound: unknown loss code ", loss);
  TORCH_CHECK(graph == 0 || graph == 1, "fastbound: unknown graph code ", graph);
  const c10::cuda::CUDAGuard guard(out.device());
  at::Tensor workspace =
      at::empty({integrate_workspace_doubles(n_seq, length, n_cols)}, acc.options());
  IntegrateProblem p{};
  p.out = out.data_ptr();
  p.stride_b = out.stride(0);
  p.stride_l = out.stride(1);
  p.n_seq = n_seq;
  p.length = length;
  p.n_cols = n_cols;
  p.x_t = x_t.const_data_ptr<int64_t>();
  p.x0 = x0.const_data_ptr<int64_t>();
  p.sigma = sigma.const_data_ptr<double>();
  p.weight = weight.const_data_ptr<double>();
  p.index = index.has_value() ? index->const_data_ptr<int64_t>() : nullptr;
  p.acc = acc.mutable_data_ptr<double>();
  p.n_slots = acc.size(0);
  p.workspace = workspace.mutable_data_ptr<double>();
  p.loss = static_cast<int>(loss);
  p.graph = static_cast<int>(graph);
  p.mask_id = mask_id;
  p.ignore_index = ignore_index;
  const cudaError_t err = integrate_step(p, dtype_of(out), c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(err == cudaSuccess, "fastbound: integrate_step CUDA launch failed: ", cudaGetErrorString(err));
}

}  // namespace

TORCH_LIBRARY_IMPL(fastbound, CUDA, m) { m.impl("integrate_step", &integrate_step_cuda); }

}  // namespace cuda
}  // namespace fastbound
