// The two vectorised loops every CPU loss kernel is built from.
//
// `row_pass` is one streaming pass over a slice of a row: it reads each score
// once, accumulates sum e^{s-shift} and sum s, and (when g is not null) writes
// the gradient g = scale * e^{s-shift} + offset in the same pass. DSE (absorbing
// and uniform) and the DCE gradient are all instances of it; `row_max` gives
// the DCE's running maximum.
#pragma once

#include <cstdint>

namespace fastbound {
namespace cpu {

template <typename acc_t>
struct RowSums {
  acc_t sum_exp;
  acc_t sum_score;
};

template <typename scalar_t, typename acc_t>
RowSums<acc_t> row_pass(const scalar_t* s, scalar_t* g, int64_t n, acc_t shift, acc_t scale,
                        acc_t offset);

template <typename scalar_t, typename acc_t>
acc_t row_max(const scalar_t* s, int64_t n);

}  // namespace cpu
}  // namespace fastbound
