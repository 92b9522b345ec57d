// Denoising cross-entropy (MDLM's loss, the I-MDCE integrand), CPU kernel.
// Per masked row: an online log-sum-exp over L1-sized chunks (one read of the
// row from memory), then one pass that writes softmax - onehot(x0). The mask
// column, when it is a column of the logits, is left out of the softmax.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <cmath>
#include <limits>

#include "fastbound/elementwise.h"
#include "loss_rows.h"
#include "row_pass.h"
#include "vectorize.h"

namespace fastbound {
namespace cpu {
namespace {

constexpr int64_t kChunk = 2048;  // 8 KiB of fp32 scores: stays in L1 between the two reads

// log sum_{y != skip} e^{s_y}, reading the row once from memory.
template <typename scalar_t, typename acc_t>
acc_t log_sum_exp(const scalar_t* s, int64_t n, int64_t skip) {
  acc_t m = -std::numeric_limits<acc_t>::infinity(), sum = 0;
  for_segments(n, skip, [&](int64_t lo, int64_t hi) {
    for (int64_t c = lo; c < hi; c += kChunk) {
      const int64_t len = std::min(kChunk, hi - c);
      const acc_t cm = row_max<scalar_t, acc_t>(s + c, len);
      if (cm > m) {
        sum = m == -std::numeric_limits<acc_t>::infinity() ? acc_t(0) : sum * exp_acc(m - cm);
        m = cm;
      }
      if (m != -std::numeric_limits<acc_t>::infinity()) {
        sum += row_pass<scalar_t, acc_t>(s + c, nullptr, len, m, acc_t(0), acc_t(0)).sum_exp;
      }
    }
  });
  return m + std::log(sum);
}

template <typename scalar_t, typename acc_t>
acc_t dce_row(const LossRow<scalar_t, acc_t>& row, int64_t mask_id, int64_t ignore_index) {
  const int64_t v = row.n_cols;
  if (row.x0 == ignore_index || row.x_t != mask_id) {
    zero_row(row.grad, v);
    return acc_t(0);
  }
  check_id(row.x0, v, "x0");
  TORCH_CHECK_VALUE(row.x0 != mask_id, "fastbound: x0 contains the mask id ", mask_id);
  const int64_t skip = mask_id < v ? mask_id : -1;
  const acc_t s_x0 = static_cast<acc_t>(row.score[row.x0]);  // before an in-place pass overwrites it
  const acc_t lse = log_sum_exp<scalar_t, acc_t>(row.score, v, skip);
  if (row.grad != nullptr) {
    for_segments(v, skip, [&](int64_t lo, int64_t hi) {
      row_pass<scalar_t, acc_t>(row.score + lo, row.grad + lo, hi - lo, lse, row.scale, acc_t(0));
    });
    if (skip >= 0) row.grad[skip] = scalar_t(0);
    row.grad[row.x0] = static_cast<scalar_t>(row.scale * (exp_acc(s_x0 - lse) - acc_t(1)));
  }
  return row.scale * (lse - s_x0);
}

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
