// Torch binding of the CUDA fused-loss kernels (csrc/cuda/losses.cu):
// `TORCH_LIBRARY_IMPL(fastbound, CUDA, m)` for dse_forward(_inplace) and
// dce_forward(_inplace) through the shared op wrapper (csrc/common/loss_ops.h),
// as csrc/cpu/losses.cpp does for the CPU. Built only with a CUDA torch.
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "binding.h"
#include "common/loss_ops.h"
#include "losses.h"

namespace fastbound {
namespace gpu {
namespace {

// Packs the checked inputs into a kernel batch. `grad` is nullptr (loss
// only), a fresh (N, V) tensor, or &in.score (in place).
template <typename cuda_t>
LossBatch<cuda_t> make_batch(const LossInputs& in, at::Tensor* grad, at::Tensor& loss) {
  using acc_t = acc_type<cuda_t>;
  LossBatch<cuda_t> batch;
  batch.score = cuda_data<cuda_t>(in.score);
  batch.score_stride = in.score.stride(0);
  batch.grad = grad != nullptr ? cuda_mutable_data<cuda_t>(*grad) : nullptr;
  batch.grad_stride = grad != nullptr ? grad->stride(0) : 0;
  batch.x_t = in.x_t.const_data_ptr<int64_t>();
  batch.x0 = in.x0.const_data_ptr<int64_t>();
  batch.sigma = in.sigma != nullptr ? in.sigma->const_data_ptr<acc_t>() : nullptr;
  batch.row_scale = in.row_scale.const_data_ptr<acc_t>();
  batch.loss = loss.mutable_data_ptr<acc_t>();
  batch.n_rows = in.score.size(0);
  batch.n_cols = in.score.size(1);
  return batch;
}

struct CudaLosses {
  static at::Tensor new_grad(const at::Tensor& score) { return at::empty(score.sizes(), score.options()); }
  // On the current stream of the scores' device.
  static void run(const LossInputs& in, at::Tensor* grad, at::Tensor& loss) {
    const c10::cuda::CUDAGuard device_guard(in.score.device());
    const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
    FB_DISPATCH_CUDA_FLOATS(in.score.scalar_type(), "fastbound_loss_cuda", [&] {
      C10_CUDA_CHECK(launch_loss<cuda_t>(make_batch<cuda_t>(in, grad, loss), in.spec, stream));
    });
  }
};

}  // namespace

TORCH_LIBRARY_IMPL(fastbound, CUDA, m) { impl_loss_ops<CudaLosses>(m); }

}  // namespace gpu
}  // namespace fastbound
