// Torch binding of `scale_rows_` on CUDA (csrc/cuda/scale_rows.cu):
// `TORCH_LIBRARY_IMPL(fastbound, CUDA, m)`, with the argument contract of
// csrc/common/scale_rows.h, as csrc/cpu/scale_rows.cpp does for the CPU.
// Built only with a CUDA torch.
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <optional>

#include "binding.h"
#include "common/scale_rows.h"
#include "scale_rows.h"

namespace fastbound {
namespace gpu {
namespace {

// On the current stream of grad's device; reads no device value.
void scale_rows_cuda(at::Tensor& grad, const at::Tensor& factor, const std::optional<at::Tensor>& x_t,
                     const std::optional<at::Tensor>& x0, int64_t mask_id, int64_t ignore_index) {
  check_scale_rows_inputs(grad, factor, x_t, x0);
  const c10::cuda::CUDAGuard device_guard(grad.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  FB_DISPATCH_CUDA_FLOATS(grad.scalar_type(), "fastbound_scale_rows_cuda", [&] {
    using acc_t = acc_type<cuda_t>;
    ScaleRowsBatch<cuda_t> batch;
    batch.grad = cuda_mutable_data<cuda_t>(grad);
    batch.grad_stride = grad.stride(0);
    batch.factor = factor.const_data_ptr<acc_t>();
    batch.factor_stride = factor.stride(0);
    batch.x_t = x_t.has_value() ? x_t->const_data_ptr<int64_t>() : nullptr;
    batch.x0 = x0.has_value() ? x0->const_data_ptr<int64_t>() : nullptr;
    batch.mask_id = mask_id;
    batch.ignore_index = ignore_index;
    batch.n_rows = grad.size(0);
    batch.n_cols = grad.size(1);
    C10_CUDA_CHECK(launch_scale_rows<cuda_t>(batch, stream));
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(fastbound, CUDA, m) { m.impl("scale_rows_", scale_rows_cuda); }

}  // namespace gpu
}  // namespace fastbound
