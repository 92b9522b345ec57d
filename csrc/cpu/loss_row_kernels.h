// The per-row loss functions of the CPU kernels (the twin of
// csrc/cuda/loss_row_kernels.cuh), shared by every op that evaluates a loss:
// the fused losses (losses.cpp) and the likelihood integration step
// (integrate.cpp). One definition of each formula and of each id rule.
//
// Each row function takes one row (pointers already offset to it), returns the
// row's loss times `row.scale` and, when `row.grad` is not null, writes the
// gradient of that loss in the same pass. The id rules are
// fastbound/elementwise.h's (shared with the CUDA kernels); a bad id raises a
// ValueError naming it. Formulas: `fastbound/elementwise.h` and
// `fastbound/reference.py`.
#pragma once

#include <c10/util/Exception.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <tuple>
#include <type_traits>
#include <vector>

#include "fastbound/elementwise.h"
#include "loss_rows.h"
#include "row_pass.h"
#include "vectorize.h"

namespace fastbound {
namespace cpu {

// Sums of row_pass over the columns [0, n) except `skip` (sum_score only with kScores).
template <bool kScores, typename scalar_t, typename acc_t>
RowSums<acc_t> row_pass_skipping(const scalar_t* s, scalar_t* g, int64_t n, int64_t skip, acc_t shift, acc_t scale,
                                 acc_t offset) {
  RowSums<acc_t> sums{0, 0};
  for_segments(n, skip, [&](int64_t lo, int64_t hi) {
    const auto part =
        row_pass<kScores, scalar_t, acc_t>(s + lo, g ? g + lo : nullptr, hi - lo, shift, scale, offset);
    sums.sum_exp += part.sum_exp;
    sums.sum_score += part.sum_score;
  });
  if (g != nullptr && skip >= 0 && skip < n) g[skip] = scalar_t(0);
  return sums;
}

// Applies the id rules' verdict on a row (fastbound/elementwise.h): raises a
// ValueError naming a bad id, zeroes the gradient row of a skipped row, and
// returns whether the row runs.
template <typename scalar_t, typename acc_t>
bool row_runs(RowRole role, const LossRow<scalar_t, acc_t>& row, int64_t mask_id) {
  switch (role) {
    case RowRole::kRun:
      return true;
    case RowRole::kSkip:
      zero_row(row.grad, row.n_cols, row.stream);
      return false;
    case RowRole::kBadXt:
      check_id(row.x_t, row.n_cols, "x_t");
      break;
    case RowRole::kBadX0:
      check_id(row.x0, row.n_cols, "x0");
      break;
    case RowRole::kX0IsMask:
      break;
  }
  TORCH_CHECK_VALUE(false, "fastbound: x0 contains the mask id ", mask_id);
}

// The sigma-only constants K of the last sigma a row function saw: the rows of one
// sequence share sigma (SEDD's is per sequence), and the log / expm1 / exp behind K cost
// as much as a row of a few hundred scores. Each parallel task runs its own copy of the
// row function (loss_rows.h, integrate.cpp), so nothing is shared between threads. A NaN
// sigma never equals the last one: its constants are recomputed (and stay NaN).
template <template <typename> class K>
class SigmaMemo {
 public:
  template <typename acc_t, typename Make>
  const K<acc_t>& get(acc_t sigma, const Make& make) {
    auto& slot = std::get<Slot<acc_t>>(slots_);
    if (!(slot.sigma == sigma)) {
      slot.k = make();
      slot.sigma = sigma;
    }
    return slot.k;
  }

 private:
  template <typename acc_t>
  struct Slot {
    acc_t sigma = std::numeric_limits<acc_t>::quiet_NaN();
    K<acc_t> k{};
  };
  std::tuple<Slot<float>, Slot<double>> slots_;
};

// Absorbing-graph score entropy (SEDD): only masked positions (x_t == mask_id) contribute.
struct DseAbsorbRow : MaskIds {
  using MaskIds::MaskIds;
  SigmaMemo<AbsorbRow> memo;

  template <typename scalar_t, typename acc_t>
  acc_t operator()(const LossRow<scalar_t, acc_t>& row) {
    const int64_t v = row.n_cols;
    if (!row_runs(role(row.x_t, row.x0, v, /*check_x_t=*/true), row, mask_id)) return acc_t(0);
    const AbsorbRow<acc_t>& k = memo.get(row.sigma, [&] { return AbsorbRow<acc_t>(row.sigma); });
    const acc_t s_x0 = static_cast<acc_t>(row.score[row.x0]);  // before an in-place pass overwrites it
    const auto sums =
        row_pass_skipping<false, scalar_t, acc_t>(row.score, row.grad, v, mask_id, acc_t(0), row.scale, acc_t(0));
    if (row.grad != nullptr) row.grad[row.x0] = static_cast<scalar_t>(row.scale * (exp_acc(s_x0) - k.r));
    return row.scale * k.loss(sums.sum_exp, s_x0);
  }
};

// Uniform-graph score entropy (SEDD): every position contributes.
struct DseUniformRow {
  int64_t ignore_index;
  SigmaMemo<UniformSigma> memo;  // one row length per call: sigma is the key
  explicit DseUniformRow(const LossSpec& spec) : ignore_index(spec.ignore_index) {}

  template <typename scalar_t, typename acc_t>
  acc_t operator()(const LossRow<scalar_t, acc_t>& row) {
    const int64_t v = row.n_cols;
    if (!row_runs(uniform_role(row.x_t, row.x0, v, ignore_index), row, -1)) return acc_t(0);
    const auto& sigma_part = memo.get(row.sigma, [&] { return UniformSigma<acc_t>(row.sigma, v); });
    const UniformRow<acc_t> k(sigma_part, v, row.x_t == row.x0);
    const acc_t s_x0 = static_cast<acc_t>(row.score[row.x0]);  // before an in-place pass overwrites it
    const auto sums = row_pass_skipping<true, scalar_t, acc_t>(row.score, row.grad, v, row.x_t, acc_t(0),
                                                               row.scale * k.inv_n, -row.scale * k.c * k.inv_n);
    if (row.grad != nullptr && !k.same) {
      row.grad[row.x0] = static_cast<scalar_t>(row.scale * (k.grad(exp_acc(s_x0)) - k.inv_a));
    }
    return row.scale * k.loss(sums.sum_exp, sums.sum_score, s_x0);
  }
};

constexpr int64_t kLseChunk = 2048;  // 8 KiB of fp32 scores: stays in L1 between the two reads

// Calls fn(lo, len) for the L1-sized chunks of the columns [0, n) except `skip`, in order.
template <typename Fn>
inline void for_chunks(int64_t n, int64_t skip, Fn&& fn) {
  for_segments(n, skip, [&](int64_t lo, int64_t hi) {
    for (int64_t c = lo; c < hi; c += kLseChunk) fn(c, std::min(kLseChunk, hi - c));
  });
}

// log sum_y e^{s_y} as (m, sum e^{s_y - m}), m the maximum of the scores read
// so far when the sum was started (or rescaled): the loss is formed as
// (m - s_{x0}) + log sum, so that a common offset of the logits cancels
// exactly in m - s_{x0} before it can cost precision.
template <typename acc_t>
struct LogSumExp {
  acc_t shift, sum;
};

// A chunk read with the running shift keeps it while the row's sum stays at
// most this (scores up to ~44 above the shift): 1 / sum, the softmax's factor,
// stays a normal float for any sane weight.
constexpr float kLazyShiftSumBound = 0x1p64f;

// log sum_{y != skip} e^{s_y}, reading the row once from memory (online over
// L1-sized chunks). The first chunk with a finite score takes a max pass (a
// first read, the second from L1) to set the shift m; later chunks are read
// once with the running m, and only a chunk whose sum would pass
// kLazyShiftSumBound (or is NaN) is done again with a max pass and a rescale.
// In place (e over the scores) every chunk takes the max pass: a chunk cannot
// be read twice. With `e`, also writes e[y] = e^{s_y - shift_k} and shifts[k] =
// shift_k for the k-th chunk (for_chunks), so that the gradient needs no
// second exp: e^{s_y - m} = e[y] e^{shift_k - m}.
template <typename scalar_t, typename acc_t>
LogSumExp<acc_t> log_sum_exp(const scalar_t* s, int64_t n, int64_t skip, acc_t* e = nullptr,
                             acc_t* shifts = nullptr) {
  constexpr acc_t kNegInf = -std::numeric_limits<acc_t>::infinity();
  const bool lazy = static_cast<const void*>(e) != static_cast<const void*>(s);
  acc_t m = kNegInf, sum = 0;
  int64_t k = 0;
  for_chunks(n, skip, [&](int64_t c, int64_t len) {
    acc_t* e_c = e ? e + c : nullptr;
    if (lazy && m != kNegInf) {
      const acc_t part = row_pass<false, scalar_t, acc_t, acc_t>(s + c, e_c, len, m, acc_t(1), acc_t(0)).sum_exp;
      if (sum + part <= acc_t(kLazyShiftSumBound)) {  // false for NaN
        sum += part;
        if (shifts) shifts[k++] = m;
        return;
      }
    }
    const acc_t cm = row_max<scalar_t, acc_t>(s + c, len);  // NaN-blind
    if (cm > m) {
      // While m is -inf every value seen was -inf or NaN, so sum is 0 or NaN: keep it.
      sum = m == kNegInf ? sum : sum * exp_acc(m - cm);
      m = cm;
    }
    // With m = -inf the chunk holds only -inf and NaN: e^{s} adds 0, or NaN.
    const acc_t shift = m == kNegInf ? acc_t(0) : m;
    sum += row_pass<false, scalar_t, acc_t, acc_t>(s + c, e_c, len, shift, acc_t(1), acc_t(0)).sum_exp;
    if (shifts) shifts[k++] = m;  // -inf marks a chunk whose e[] are all 0 (or NaN)
  });
  return {m, sum};
}

// Per-thread float rows for the DCE's exponentials of 16-bit scores, and its chunk shifts.
template <typename acc_t>
acc_t* scratch_row(int slot, int64_t n) {
  thread_local std::vector<acc_t> rows[2];
  if (static_cast<int64_t>(rows[slot].size()) < n) rows[slot].resize(static_cast<size_t>(n));
  return rows[slot].data();
}

// Masked cross-entropy (MDLM): -log softmax(s)_{x0} where x_t is the mask; the
// mask column, when it is a column of the logits, is left out of the softmax.
// The gradient: one exp per score, kept (in the gradient row itself, or a
// float row for 16-bit scores) and rescaled by softmax's 1 / sum per chunk.
struct DceRow : MaskIds {
  using MaskIds::MaskIds;

  template <typename scalar_t, typename acc_t>
  acc_t operator()(const LossRow<scalar_t, acc_t>& row) {
    const int64_t v = row.n_cols;
    if (!row_runs(role(row.x_t, row.x0, v, /*check_x_t=*/false), row, mask_id)) return acc_t(0);
    const int64_t skip = mask_id < v ? mask_id : -1;
    const acc_t s_x0 = static_cast<acc_t>(row.score[row.x0]);  // before an in-place pass overwrites it
    if (row.grad == nullptr) {
      const LogSumExp<acc_t> lse = log_sum_exp<scalar_t, acc_t>(row.score, v, skip);
      return row.scale * ((lse.shift - s_x0) + std::log(lse.sum));
    }
    acc_t* e = std::is_same_v<scalar_t, acc_t> ? reinterpret_cast<acc_t*>(row.grad) : scratch_row<acc_t>(0, v);
    acc_t* shifts = scratch_row<acc_t>(1, v / kLseChunk + 2);
    const LogSumExp<acc_t> lse = log_sum_exp<scalar_t, acc_t>(row.score, v, skip, e, shifts);
    // softmax = e^{s - m} / sum: the shift by m (exact) rather than by m + log sum (rounded).
    const acc_t g_scale = row.scale / lse.sum;
    int64_t k = 0;
    for_chunks(v, skip, [&](int64_t c, int64_t len) {
      // A chunk kept before any finite score holds e^{-inf} = 0 (or NaN): its factor is
      // 0 (NaN for a NaN or infinite g_scale), not e^{0 - m}, which overflows for m < -88.
      const acc_t shift = shifts[k++];
      const acc_t f = shift == -std::numeric_limits<acc_t>::infinity() ? g_scale * acc_t(0)
                                                                        : g_scale * exp_acc(shift - lse.shift);
      row_rescale<scalar_t, acc_t>(e + c, row.grad + c, len, f, row.stream);
    });
    if (skip >= 0) row.grad[skip] = scalar_t(0);
    row.grad[row.x0] = static_cast<scalar_t>(g_scale * exp_acc(s_x0 - lse.shift) - row.scale);
    return row.scale * ((lse.shift - s_x0) + std::log(lse.sum));
  }
};

// Calls f(row_fn) with the row function of `spec` (checked by check_loss_inputs
// or check_integrate_inputs).
template <typename F>
void visit_row_fn(const LossSpec& spec, F&& f) {
  if (spec.loss == kLossDce) {
    f(DceRow(spec));
  } else if (spec.graph == kGraphAbsorb) {
    f(DseAbsorbRow(spec));
  } else {
    f(DseUniformRow(spec));
  }
}

}  // namespace cpu
}  // namespace fastbound
