// The fused losses (DSE: SEDD's score entropy; DCE: MDLM's cross-entropy), CPU
// kernels; the twin of csrc/cuda/losses.cu. One streaming pass per row reads
// the scores once and writes the gradient in the same pass (the DCE reads its
// row a second time from L1), into a reused buffer (buffer_pool.h). The per-row
// formulas are `loss_row_kernels.h` (shared with the integration step); the
// ops' arguments are unpacked and checked by csrc/common/loss_ops.h.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include "common/loss_ops.h"
#include "buffer_pool.h"
#include "loss_row_kernels.h"
#include "loss_rows.h"

namespace fastbound {
namespace cpu {
namespace {

struct CpuLosses {
  static at::Tensor new_grad(const at::Tensor& score) { return pooled_empty(score.sizes(), score.options()); }
  static void run(const LossInputs& in, at::Tensor* grad, at::Tensor& loss) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, in.score.scalar_type(), "fastbound_loss_cpu", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      visit_row_fn(in.spec, [&](const auto& row_fn) { for_each_row<scalar_t, acc_t>(in, grad, loss, row_fn); });
    });
  }
};

}  // namespace

TORCH_LIBRARY_IMPL(fastbound, CPU, m) { impl_loss_ops<CpuLosses>(m); }

}  // namespace cpu
}  // namespace fastbound
