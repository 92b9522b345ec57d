// Denoising cross-entropy (MDLM's loss, the I-MDCE integrand), CPU kernel.
// Per masked row: an online log-sum-exp over L1-sized chunks (one read of the
// row from memory), then one pass that writes softmax - onehot(x0). The mask
// column, when it is a column of the logits, is left out of the softmax.
// Per-row formula: `loss_row_kernels.h` (shared with the integration step).
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include "loss_row_kernels.h"
#include "loss_rows.h"

namespace fastbound {
namespace cpu {
namespace {

void dce_rows(const at::Tensor& logits, at::Tensor* grad, const at::Tensor& x_t,
              const at::Tensor& x0, const at::Tensor& row_scale, int64_t mask_id,
              int64_t ignore_index, at::Tensor& loss) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "dce_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    // DCE has no sigma: the row scale stands in for it in the shared row struct.
    for_each_row<scalar_t, acc_t>(logits, grad, row_scale, x_t, x0, row_scale, loss,
                                  [&](const auto& row) { return dce_row(row, mask_id, ignore_index); });
  });
}

std::tuple<at::Tensor, at::Tensor> dce_forward(const at::Tensor& logits, const at::Tensor& x_t,
                                               const at::Tensor& x0, const at::Tensor& row_scale,
                                               int64_t mask_id, int64_t ignore_index, bool need_grad) {
  check_loss_inputs(logits, row_scale, x_t, x0, row_scale);
  at::Tensor loss = at::empty({logits.size(0)}, row_scale.options());
  at::Tensor grad = need_grad ? at::empty(logits.sizes(), logits.options()) : at::empty({0}, logits.options());
  dce_rows(logits, need_grad ? &grad : nullptr, x_t, x0, row_scale, mask_id, ignore_index, loss);
  return {loss, grad};
}

at::Tensor dce_forward_inplace(at::Tensor& logits, const at::Tensor& x_t, const at::Tensor& x0,
                               const at::Tensor& row_scale, int64_t mask_id, int64_t ignore_index) {
  check_loss_inputs(logits, row_scale, x_t, x0, row_scale);
  at::Tensor loss = at::empty({logits.size(0)}, row_scale.options());
  dce_rows(logits, &logits, x_t, x0, row_scale, mask_id, ignore_index, loss);
  return loss;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastbound, CPU, m) {
  m.impl("dce_forward", &dce_forward);
  m.impl("dce_forward_inplace", &dce_forward_inplace);
}

}  // namespace cpu
}  // namespace fastbound
