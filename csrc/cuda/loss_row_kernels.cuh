// The per-row loss functors of the CUDA kernels (the twin of
// csrc/cpu/loss_row_kernels.h), shared by the fused losses (losses.cu) and the
// likelihood integration step (integrate.cu). One definition of each formula
// and of each id rule.
//
// A functor is called by every thread of the group that owns a row as
// row_fn(group, row); it returns the row's loss times `row.scale` (on every
// thread) and, when `row.grad` is not null, writes the gradient of that loss
// in the same pass. The per-row constants (fastbound/elementwise.h) depend on
// sigma and the ids only, so they are known before the row is read. An id out
// of range gives a NaN loss and a NaN gradient row instead of a read out of
// bounds (the id rules are fastbound/elementwise.h's, shared with the CPU); so
// does a score-entropy row that runs with a sigma that is not positive and
// finite (sigma = 0 would give an infinite loss, sigma = inf on the uniform
// graph a finite wrong one). This NaN policy is all that guards the kernels
// when the Python value checks do not run (tracing, value checks "off",
// CUDA-graph capture; see fastbound/_validate.py).
#pragma once

#include "fastbound/elementwise.h"
#include "loss_rows.cuh"

namespace fastbound {
namespace gpu {

// The loss of a row that does not run (the id rules of fastbound/elementwise.h):
// 0 when skipped, NaN for a bad id.
template <typename acc_t>
FB_HD acc_t not_run_value(RowRole role) {
  return role == RowRole::kSkip ? acc_t(0) : quiet_nan<acc_t>();
}

// The score entropy's sigma must be positive and finite (false for NaN).
template <typename acc_t>
FB_HD bool sigma_ok(acc_t sigma) {
  return sigma > acc_t(0) && sigma < acc_t(INFINITY);
}

// Absorbing graph (SEDD): only masked positions (x_t == mask_id) contribute.
//   loss = scale * (sum_{y != mask} e^{s_y} - r s_{x0} + r (log r - 1))
//   grad = scale * (e^{s_y} - r [y = x0]) for y != mask, 0 in the mask column.
struct DseAbsorbRow : MaskIds {
  using MaskIds::MaskIds;

  template <typename Group, typename scalar_t>
  FB_HD acc_type<scalar_t> operator()(const Group& group, const LossRow<scalar_t>& row) const {
    using acc_t = acc_type<scalar_t>;
    const int64_t v = row.n_cols, x0 = row.x0;
    const RowRole r = role(row.x_t, x0, v, /*check_x_t=*/true);
    if (r != RowRole::kRun) return finish_row(group, row, not_run_value<acc_t>(r));
    if (!sigma_ok(row.sigma)) return finish_row(group, row, quiet_nan<acc_t>());
    const AbsorbRow<acc_t> k(row.sigma);
    const acc_t s_x0 = to_acc(row.score[x0]);
    group.sync();  // every thread has read s[x0] before the pass may overwrite it (in place)
    ExpPass<acc_t> pass(mask_id, x0, acc_t(0), row.scale, acc_t(0), -row.scale * k.r);
    for_each_column(group, row.score, row.grad, v, pass);
    const Pair<acc_t> sums = group.allreduce(Pair<acc_t>{pass.sum_exp, pass.sum_score}, AddPairs<acc_t>());
    return row.scale * k.loss(sums.a, s_x0);
  }
};

// Uniform graph (SEDD): every position contributes; column x_t is left out.
//   grad = scale * ((e^{s_y} - c) / N - [x_t != x0][y = x0] / a) for y != x_t, 0 at x_t.
struct DseUniformRow {
  int64_t ignore_index;
  FB_HD explicit DseUniformRow(const LossSpec& spec) : ignore_index(spec.ignore_index) {}

  template <typename Group, typename scalar_t>
  FB_HD acc_type<scalar_t> operator()(const Group& group, const LossRow<scalar_t>& row) const {
    using acc_t = acc_type<scalar_t>;
    const int64_t v = row.n_cols, x_t = row.x_t, x0 = row.x0;
    const RowRole r = uniform_role(x_t, x0, v, ignore_index);
    if (r != RowRole::kRun) return finish_row(group, row, not_run_value<acc_t>(r));
    if (!sigma_ok(row.sigma)) return finish_row(group, row, quiet_nan<acc_t>());
    const UniformRow<acc_t> k(row.sigma, v, x_t == x0);
    const acc_t scale = row.scale;
    const acc_t s_x0 = to_acc(row.score[x0]);
    group.sync();  // every thread has read s[x0] before the pass may overwrite it (in place)
    const acc_t x0_term = k.same ? acc_t(0) : -scale * k.inv_a;
    ExpPass<acc_t> pass(x_t, x0, acc_t(0), scale * k.inv_n, -scale * k.c * k.inv_n, x0_term);
    for_each_column(group, row.score, row.grad, v, pass);
    const Pair<acc_t> sums = group.allreduce(Pair<acc_t>{pass.sum_exp, pass.sum_score}, AddPairs<acc_t>());
    return scale * k.loss(sums.a, sums.b, s_x0);
  }
};

// Cross-entropy (MDLM), at masked positions (x_t == mask_id): an online
// log-sum-exp that reads the row once, then, for the gradient, one pass that
// writes softmax - onehot(x0).
//   m = max_{y != mask} s_y,  sum = sum_{y != mask} e^{s_y - m}
//   loss = scale * ((m - s_{x0}) + log sum)
//   grad = scale * (e^{s_y - m} / sum - [y = x0]) for y != mask, 0 in the mask column.
struct DceRow : MaskIds {
  using MaskIds::MaskIds;

  template <typename Group, typename scalar_t>
  FB_HD acc_type<scalar_t> operator()(const Group& group, const LossRow<scalar_t>& row) const {
    using acc_t = acc_type<scalar_t>;
    const int64_t v = row.n_cols, x0 = row.x0;
    const RowRole r = role(row.x_t, x0, v, /*check_x_t=*/false);
    if (r != RowRole::kRun) return finish_row(group, row, not_run_value<acc_t>(r));
    const int64_t skip = mask_id < v ? mask_id : -1;
    const acc_t s_x0 = to_acc(row.score[x0]);
    OnlineLogSumExp<acc_t> online(skip);
    for_each_column(group, row.score, static_cast<scalar_t*>(nullptr), v, online);
    const Pair<acc_t> m_sum =
        group.allreduce(Pair<acc_t>{online.running_max, online.sum}, MergeLogSumExp<acc_t>());
    group.sync();  // every thread has read the row and s[x0] before the gradient pass may overwrite them
    const acc_t m = m_sum.a, sum = m_sum.b;
    if (row.grad != nullptr) {
      // softmax = e^{s - m} / sum: the shift by m (exact) rather than by m + log sum (rounded).
      ExpPass<acc_t> pass(skip, x0, m, row.scale / sum, acc_t(0), -row.scale);
      for_each_column(group, row.score, row.grad, v, pass);
    }
    // (m - s_x0) first: a common offset of the logits cancels exactly before it can cost precision.
    return row.scale * ((m - s_x0) + log(sum));
  }
};

// Calls f(row_fn) with the row functor of `spec` (checked by the binding);
// returns cudaErrorInvalidValue for an unknown code, else f's status.
template <typename F>
cudaError_t visit_row_fn(const LossSpec& spec, F&& f) {
  if (spec.loss == kLossDce) return f(DceRow(spec));
  if (spec.loss != kLossDse) return cudaErrorInvalidValue;
  if (spec.graph == kGraphAbsorb) return f(DseAbsorbRow(spec));
  if (spec.graph == kGraphUniform) return f(DseUniformRow(spec));
  return cudaErrorInvalidValue;
}

}  // namespace gpu
}  // namespace fastbound
