// Denoising score entropy (SEDD's loss), CPU kernel: one streaming pass per
// row reads the scores once and writes the gradient in the same pass.
// Per-row formulas: `loss_row_kernels.h` (shared with the integration step).
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include "fastbound/elementwise.h"
#include "loss_row_kernels.h"
#include "loss_rows.h"

namespace fastbound {
namespace cpu {
namespace {

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
