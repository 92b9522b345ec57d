// The vectorised loops every CPU loss kernel is built from.
//
// `row_pass` is one streaming pass over a slice of a row: it reads each score
// once, accumulates sum e^{s-shift} and sum s, and (when g is not null) writes
// g = scale * e^{s-shift} + offset in the same pass, as the scores' dtype or
// (the DCE's exponentials, `out_t`) as the accumulation type. DSE (absorbing
// and uniform) and the DCE are all instances of it; `row_max` gives the DCE's
// running maximum and `row_rescale` its second pass, g = factor * e;
// `row_scale_inplace` is the backward's rescale of a saved gradient row.
#pragma once

#include <cstdint>

namespace fastbound {
namespace cpu {

template <typename acc_t>
struct RowSums {
  acc_t sum_exp;
  acc_t sum_score;
};

// kScores: whether sum_score is wanted (the uniform graph's); without it
// sum_score is 0 and the pass saves its adds (one in eight of the loop's vector ops).
template <bool kScores, typename scalar_t, typename acc_t, typename out_t = scalar_t>
RowSums<acc_t> row_pass(const scalar_t* s, out_t* g, int64_t n, acc_t shift, acc_t scale, acc_t offset);

template <typename scalar_t, typename acc_t>
acc_t row_max(const scalar_t* s, int64_t n);

// g[i] = factor * e[i], rounded once to the scores' dtype; e may alias g. `stream`: 16-bit g
// (not aliased) written by non-temporal stores (csrc/cpu/loss_rows.h kStreamBytes).
template <typename scalar_t, typename acc_t>
void row_rescale(const acc_t* e, scalar_t* g, int64_t n, acc_t factor, bool stream = false);

// g[i] *= factor in place, in the accumulation type, rounded once.
template <typename scalar_t, typename acc_t>
void row_scale_inplace(scalar_t* g, int64_t n, acc_t factor);

}  // namespace cpu
}  // namespace fastbound
