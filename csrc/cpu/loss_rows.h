// Plumbing shared by the CPU loss kernels (DSE and DCE): the internal
// contract checks on what the Python layer passes in, the output
// allocation, and the parallel loop over rows.
//
// The Python layer (`fastbound/losses.py`) validates user input and flattens
// it; the checks here only guard memory safety, so a caller of the raw op
// gets an error instead of an out-of-bounds read.
#pragma once

#include <ATen/MemoryOverlap.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <tuple>

namespace fastbound {
namespace cpu {

// One row of a loss kernel: pointers already offset to the row.
template <typename scalar_t, typename acc_t>
struct LossRow {
  const scalar_t* score;  // V scores
  scalar_t* grad;         // V gradient entries, or nullptr
  int64_t n_cols;         // V
  acc_t sigma;            // total noise (unused by DCE)
  int64_t x_t, x0;        // ids at this position
  acc_t scale;            // weight (and 1/count for "mean")
};

// Checks the flattened inputs of a loss op. `score` is (N, V) with unit
// column stride; the per-row tensors are contiguous (N,).
// `inplace`: the gradient will overwrite `score`, so its rows must not share memory.
inline void check_loss_inputs(const at::Tensor& score, const at::Tensor& sigma,
                              const at::Tensor& x_t, const at::Tensor& x0,
                              const at::Tensor& row_scale, bool inplace = false) {
  if (inplace) at::assert_no_internal_overlap(score);
  TORCH_CHECK(score.dim() == 2, "fastbound: score must be (N, V), got ", score.sizes());
  TORCH_CHECK(score.size(1) == 0 || score.stride(1) == 1 || score.size(1) == 1,
              "fastbound: score must have unit stride in its last dimension");
  const auto n = score.size(0);
  const auto acc = score.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  for (const auto* t : {&sigma, &row_scale}) {
    TORCH_CHECK(t->dim() == 1 && t->size(0) == n && t->is_contiguous() && t->scalar_type() == acc,
                "fastbound: per-row float tensors must be contiguous (N,) of the accumulation dtype");
  }
  for (const auto* t : {&x_t, &x0}) {
    TORCH_CHECK(t->dim() == 1 && t->size(0) == n && t->is_contiguous() && t->scalar_type() == at::kLong,
                "fastbound: ids must be contiguous (N,) int64");
  }
}

// Runs row_fn(LossRow) -> loss for every row, in parallel, writing loss[i].
template <typename scalar_t, typename acc_t, typename RowFn>
void for_each_row(const at::Tensor& score, at::Tensor* grad, const at::Tensor& sigma,
                  const at::Tensor& x_t, const at::Tensor& x0, const at::Tensor& row_scale,
                  at::Tensor& loss, RowFn&& row_fn) {
  const int64_t n = score.size(0), v = score.size(1);
  const scalar_t* s = score.const_data_ptr<scalar_t>();
  scalar_t* g = grad ? grad->mutable_data_ptr<scalar_t>() : nullptr;
  const int64_t s_stride = score.stride(0);
  const int64_t g_stride = grad ? grad->stride(0) : 0;
  const acc_t* sig = sigma.const_data_ptr<acc_t>();
  const acc_t* scl = row_scale.const_data_ptr<acc_t>();
  const int64_t* xt = x_t.const_data_ptr<int64_t>();
  const int64_t* x0p = x0.const_data_ptr<int64_t>();
  acc_t* out = loss.mutable_data_ptr<acc_t>();
  // About 64 KiB of scores per task keeps scheduling overhead negligible.
  const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 14) / std::max<int64_t>(v, 1));
  at::parallel_for(0, n, grain, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      LossRow<scalar_t, acc_t> row{s + i * s_stride, g ? g + i * g_stride : nullptr, v,
                                   sig[i], xt[i], x0p[i], scl[i]};
      out[i] = row_fn(row);
    }
  });
}

// Writes zeros over a row's gradient (positions that do not contribute).
template <typename scalar_t>
inline void zero_row(scalar_t* g, int64_t n) {
  if (g != nullptr) std::fill(g, g + n, scalar_t(0));
}

// Raises a ValueError naming the argument when an id is outside [0, n).
inline void check_id(int64_t id, int64_t n, const char* name) {
  TORCH_CHECK_VALUE(id >= 0 && id < n, "fastbound: ", name, " contains id ", id,
                    " outside [0, ", n, ")");
}

}  // namespace cpu
}  // namespace fastbound
