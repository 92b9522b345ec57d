// The fused losses (DSE: SEDD's score entropy; DCE: MDLM's cross-entropy), CPU
// kernels; the twin of csrc/cuda/losses.cu. One streaming pass per row reads
// the scores once and writes the gradient in the same pass (the DCE reads its
// row a second time from L1), into a fresh buffer backed by huge pages
// (huge_pages.h). The per-row formulas are `loss_row_kernels.h`
// (shared with the integration step); the ops' arguments are unpacked and
// checked by csrc/common/loss_ops.h.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include "common/loss_ops.h"
#include "huge_pages.h"
#include "loss_row_kernels.h"
#include "loss_rows.h"

namespace fastbound {
namespace cpu {
namespace {

struct CpuLosses {
  static void run(const LossInputs& in, at::Tensor* grad, at::Tensor& loss) {
    // A fresh gradient buffer (not the scores, in place) is written whole: back it with huge pages.
    if (grad != nullptr && !grad->is_same(in.score)) advise_huge_pages(*grad);
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
