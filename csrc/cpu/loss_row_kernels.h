// The per-row loss functions of the CPU kernels, shared by every op that
// evaluates a loss: the fused losses (dse.cpp, dce.cpp) and the likelihood
// integration step (integrate.cpp). One definition of each formula.
//
// Each function takes one row (pointers already offset to it), returns the
// row's loss times `row.scale` and, when `row.grad` is not null, writes the
// gradient of that loss in the same pass. Formulas: `fastbound/elementwise.h`
// and `fastbound/reference.py`.
#pragma once

#include <c10/util/Exception.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>

#include "fastbound/elementwise.h"
#include "loss_rows.h"
#include "row_pass.h"
#include "vectorize.h"

namespace fastbound {
namespace cpu {

// Absorbing-graph score entropy (SEDD): only masked positions (x_t == V-1) contribute.
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

// Uniform-graph score entropy (SEDD): every position contributes.
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

constexpr int64_t kLseChunk = 2048;  // 8 KiB of fp32 scores: stays in L1 between the two reads

// log sum_{y != skip} e^{s_y}, reading the row once from memory (online over L1-sized chunks).
template <typename scalar_t, typename acc_t>
acc_t log_sum_exp(const scalar_t* s, int64_t n, int64_t skip) {
  acc_t m = -std::numeric_limits<acc_t>::infinity(), sum = 0;
  for_segments(n, skip, [&](int64_t lo, int64_t hi) {
    for (int64_t c = lo; c < hi; c += kLseChunk) {
      const int64_t len = std::min(kLseChunk, hi - c);
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

// Masked cross-entropy (MDLM): -log softmax(s)_{x0} where x_t is the mask; the
// mask column, when it is a column of the logits, is left out of the softmax.
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

}  // namespace cpu
}  // namespace fastbound
