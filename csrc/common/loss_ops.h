// The four fused-loss ops (dse_forward, dse_forward_inplace, dce_forward,
// dce_forward_inplace; schemas in csrc/ops.cpp) for any backend, in one place:
// the argument unpacking, the contract checks (checks.h) and the output
// allocation. A backend supplies only its row loop:
//
//   struct Backend {
//     // An uninitialised buffer like the scores for the gradient, which run writes whole.
//     static at::Tensor new_grad(const at::Tensor& score);
//     // Writes loss (N,) and, when grad is not null, d loss / d score into *grad
//     // (which may be &in.score: in place).
//     static void run(const LossInputs& in, at::Tensor* grad, at::Tensor& loss);
//   };
//
// and registers the ops with `impl_loss_ops<Backend>(m)` (csrc/cpu/losses.cpp,
// csrc/cuda/losses_binding.cpp).
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <tuple>

#include "common/checks.h"
#include "fastbound/elementwise.h"

namespace fastbound {

template <typename Backend>
std::tuple<at::Tensor, at::Tensor> loss_forward(const LossInputs& in, bool need_grad) {
  check_loss_inputs(in, /*inplace=*/false);
  at::Tensor loss = at::empty({in.score.size(0)}, in.row_scale.options());
  at::Tensor grad = need_grad ? Backend::new_grad(in.score) : at::empty({0}, in.score.options());
  Backend::run(in, need_grad ? &grad : nullptr, loss);
  return {loss, grad};
}

template <typename Backend>
at::Tensor loss_forward_inplace(at::Tensor& score, const LossInputs& in) {
  check_loss_inputs(in, /*inplace=*/true);
  at::Tensor loss = at::empty({score.size(0)}, in.row_scale.options());
  Backend::run(in, &score, loss);
  return loss;
}

inline LossInputs dse_inputs(const at::Tensor& score, const at::Tensor& sigma, const at::Tensor& x_t,
                             const at::Tensor& x0, const at::Tensor& row_scale, int64_t graph, int64_t mask_id,
                             int64_t ignore_index) {
  return {score, &sigma, x_t, x0, row_scale, {kLossDse, graph, mask_id, ignore_index}};
}

inline LossInputs dce_inputs(const at::Tensor& logits, const at::Tensor& x_t, const at::Tensor& x0,
                             const at::Tensor& row_scale, int64_t mask_id, int64_t ignore_index) {
  return {logits, nullptr, x_t, x0, row_scale, {kLossDce, kGraphAbsorb, mask_id, ignore_index}};
}

template <typename Backend>
void impl_loss_ops(torch::Library& m) {
  m.impl("dse_forward", [](const at::Tensor& score, const at::Tensor& sigma, const at::Tensor& x_t,
                           const at::Tensor& x0, const at::Tensor& row_scale, int64_t graph, int64_t mask_id,
                           int64_t ignore_index, bool need_grad) {
    return loss_forward<Backend>(dse_inputs(score, sigma, x_t, x0, row_scale, graph, mask_id, ignore_index),
                                 need_grad);
  });
  m.impl("dse_forward_inplace", [](at::Tensor& score, const at::Tensor& sigma, const at::Tensor& x_t,
                                   const at::Tensor& x0, const at::Tensor& row_scale, int64_t graph,
                                   int64_t mask_id, int64_t ignore_index) {
    return loss_forward_inplace<Backend>(score,
                                         dse_inputs(score, sigma, x_t, x0, row_scale, graph, mask_id, ignore_index));
  });
  m.impl("dce_forward", [](const at::Tensor& logits, const at::Tensor& x_t, const at::Tensor& x0,
                           const at::Tensor& row_scale, int64_t mask_id, int64_t ignore_index, bool need_grad) {
    return loss_forward<Backend>(dce_inputs(logits, x_t, x0, row_scale, mask_id, ignore_index), need_grad);
  });
  m.impl("dce_forward_inplace", [](at::Tensor& logits, const at::Tensor& x_t, const at::Tensor& x0,
                                   const at::Tensor& row_scale, int64_t mask_id, int64_t ignore_index) {
    return loss_forward_inplace<Backend>(logits, dce_inputs(logits, x_t, x0, row_scale, mask_id, ignore_index));
  });
}

}  // namespace fastbound
