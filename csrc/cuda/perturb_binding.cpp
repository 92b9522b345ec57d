// Torch binding of the CUDA noise kernels (csrc/cuda/perturb.cu):
// `TORCH_LIBRARY_IMPL(fastbound, CUDA, m)` for perturb and philox4x32,
// mirroring csrc/cpu/perturb.cpp. Built only with a CUDA torch.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

#include "common/checks.h"
#include "fastbound/elementwise.h"
#include "perturb.h"

namespace fastbound {
namespace gpu {
namespace {

IdType id_type(at::ScalarType t) {
  switch (t) {
    case at::kLong: return IdType::kInt64;
    case at::kInt: return IdType::kInt32;
    case at::kShort: return IdType::kInt16;
    case at::kChar: return IdType::kInt8;
    case at::kByte: return IdType::kUInt8;
    default: TORCH_CHECK_TYPE(false, "fastbound.perturb: x0 must hold integer ids, got ", t);
  }
}

std::tuple<at::Tensor, at::Tensor> perturb(const at::Tensor& x0, const std::optional<at::Tensor>& threshold,
                                           const std::optional<at::Tensor>& num_masked,
                                           const std::optional<at::Tensor>& maskable, int64_t vocab_size,
                                           int64_t mask_id, int64_t graph, int64_t seed, int64_t offset) {
  check_perturb_inputs(x0, threshold, num_masked, maskable, vocab_size, graph);
  TORCH_CHECK(x0.is_cuda(), "fastbound.perturb: the CUDA kernel needs CUDA tensors, got ", x0.device());
  const c10::cuda::CUDAGuard device_guard(x0.device());
  at::Tensor x_t = at::empty_like(x0);
  at::Tensor mask = at::empty(x0.sizes(), x0.options().dtype(at::kBool));
  PerturbLaunch a{};
  a.x0 = x0.const_data_ptr();
  a.x_t = x_t.mutable_data_ptr();
  a.mask = mask.mutable_data_ptr<bool>();
  a.id_type = id_type(x0.scalar_type());
  a.rows = x0.size(0);
  a.cols = x0.size(1);
  if (threshold.has_value()) {
    a.threshold = threshold->const_data_ptr<int32_t>();
    a.threshold_row_stride = threshold->size(0) == 1 ? 0 : threshold->stride(0);
    a.threshold_col_stride = threshold->size(1) == 1 ? 0 : 1;
  } else {
    a.num_masked = num_masked->const_data_ptr<int64_t>();
  }
  a.maskable = maskable.has_value() ? maskable->const_data_ptr<bool>() : nullptr;
  a.vocab_size = static_cast<uint32_t>(vocab_size);
  a.mask_id = mask_id;
  a.uniform = graph == kGraphUniform;
  a.seed = static_cast<uint64_t>(seed);
  a.offset = static_cast<uint64_t>(offset);
  C10_CUDA_CHECK(launch_perturb(a, c10::cuda::getCurrentCUDAStream()));
  return {x_t, mask};
}

at::Tensor philox4x32(const at::Tensor& counter, int64_t seed) {
  TORCH_CHECK(counter.dim() == 2 && counter.size(1) == 4 && counter.scalar_type() == at::kLong && counter.is_cuda(),
              "fastbound.philox4x32: counter must be a CUDA int64 (N, 4) tensor");
  const c10::cuda::CUDAGuard device_guard(counter.device());
  const at::Tensor c = counter.contiguous();
  at::Tensor out = at::empty_like(c);
  C10_CUDA_CHECK(launch_philox4x32(c.const_data_ptr<int64_t>(), out.mutable_data_ptr<int64_t>(), c.size(0),
                                   static_cast<uint64_t>(seed), c10::cuda::getCurrentCUDAStream()));
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastbound, CUDA, m) {
  m.impl("perturb", &perturb);
  m.impl("philox4x32", &philox4x32);
}

}  // namespace gpu
}  // namespace fastbound
