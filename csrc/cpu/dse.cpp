// Denoising score entropy (SEDD's loss), CPU kernel: one streaming pass per
// row reads the scores once and writes the gradient in the same pass.
// Formulas: `fastbound/elementwise.h` and `fastbound/reference.py`.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include "fastbound/elementwise.h"
#include "loss_rows.h"
#include "row_pass.h"
#include "vectorize.h"

namespace fastbound {
namespace cpu {
namespace {

// Absorbing graph: only masked positions (x_t == V-1) contribute.
template <typename scalar_t, typename acc_t>
acc_t dse_absorb_row(const LossRow<scalar_t, acc_t>& row, int64_t ignore_index) {
  const int64_t v = row.n_cols, mask = v - 1;
  check_id(row.x_t, v, "x_t");
  if (row.x0 == ignore_index || row.x_t != mask) {
    zero_row(row.grad, v);
    return acc_t(0);
  }
  check_id(row.x0, mask, "x0");
  const AbsorbRow<acc_t> k(row.sigma);
  const acc_t s_x0 = static_cast<acc_t>(row.score[row.x0]);  // before an in-place pass overwrites it
  const auto sums = row_pass<scalar_t, acc_t>(row.score, row.grad, mask, acc_t(0), row.scale, acc_t(0));
  if (row.grad != nullptr) {
    row.grad[mask] = scalar_t(0);
    row.grad[row.x0] = static_cast<scalar_t>(row.scale * (exp_acc(s_x0) - k.r));
  }
  return row.scale * k.loss(sums.sum_exp, s_x0);
}

// Uniform graph: every position contributes.
template <typename scalar_t, typename acc_t>
acc_t dse_uniform_row(const LossRow<scalar_t, acc_t>& row, int64_t ignore_index) {
  const int64_t v = row.n_cols;
  check_id(row.x_t, v, "x_t");
  if (row.x0 == ignore_index) {
    zero_row(row.grad, v);
    return acc_t(0);
  }
  check_id(row.x0, v, "x0");
  const UniformRow<acc_t> k(row.sigma, v, row.x_t == row.x0);
  const acc_t g_scale = row.scale * k.inv_n, g_offset = -row.scale * k.c * k.inv_n;
  const acc_t s_x0 = static_cast<acc_t>(row.score[row.x0]);  // before an in-place pass overwrites it
  RowSums<acc_t> sums{0, 0};
  for_segments(v, row.x_t, [&](int64_t lo, int64_t hi) {
    const auto part = row_pass<scalar_t, acc_t>(row.score + lo, row.grad ? row.grad + lo : nullptr,
                                                hi - lo, acc_t(0), g_scale, g_offset);
    sums.sum_exp += part.sum_exp;
    sums.sum_score += part.sum_score;
  });
  if (row.grad != nullptr) {
    row.grad[row.x_t] = scalar_t(0);
    if (!k.same) {
      row.grad[row.x0] = static_cast<scalar_t>(row.scale * (k.grad(exp_acc(s_x0)) - k.inv_a));
    }
  }
  return row.scale * k.loss(sums.sum_exp, sums.sum_score, s_x0);
}

// Computes the per-row loss and, when `grad` is given, writes the gradient.
void dse_rows(const at::Tensor& score, at::Tensor* grad, const at::Tensor& sigma,
              const at::Tensor& x_t, const at::Tensor& x0, const at::Tensor& row_scale,
              int64_t graph, int64_t ignore_index, at::Tensor& loss) {
  TORCH_CHECK(graph == kGraphAbsorb || graph == kGraphUniform, "fastbound: unknown graph code ", graph);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, score.scalar_type(), "dse_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    if (graph == kGraphAbsorb) {
      for_each_row<scalar_t, acc_t>(score, grad, sigma, x_t, x0, row_scale, loss,
                                    [&](const auto& row) { return dse_absorb_row(row, ignore_index); });
    } else {
      for_each_row<scalar_t, acc_t>(score, grad, sigma, x_t, x0, row_scale, loss,
                                    [&](const auto& row) { return dse_uniform_row(row, ignore_index); });
    }
  });
}

std::tuple<at::Tensor, at::Tensor> dse_forward(const at::Tensor& score, const at::Tensor& sigma,
                                               const at::Tensor& x_t, const at::Tensor& x0,
                                               const at::Tensor& row_scale, int64_t graph,
                                               int64_t ignore_index, bool need_grad) {
  check_loss_inputs(score, sigma, x_t, x0, row_scale);
  at::Tensor loss = at::empty({score.size(0)}, sigma.options());
  at::Tensor grad = need_grad ? at::empty(score.sizes(), score.options()) : at::empty({0}, score.options());
  dse_rows(score, need_grad ? &grad : nullptr, sigma, x_t, x0, row_scale, graph, ignore_index, loss);
  return {loss, grad};
}

at::Tensor dse_forward_inplace(at::Tensor& score, const at::Tensor& sigma, const at::Tensor& x_t,
                               const at::Tensor& x0, const at::Tensor& row_scale, int64_t graph,
                               int64_t ignore_index) {
  check_loss_inputs(score, sigma, x_t, x0, row_scale);
  at::Tensor loss = at::empty({score.size(0)}, sigma.options());
  dse_rows(score, &score, sigma, x_t, x0, row_scale, graph, ignore_index, loss);
  return loss;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastbound, CPU, m) {
  m.impl("dse_forward", &dse_forward);
  m.impl("dse_forward_inplace", &dse_forward_inplace);
}

}  // namespace cpu
}  // namespace fastbound
