// The row driver of the CPU loss kernels (the twin of csrc/cuda/loss_rows.cuh):
// the row struct the per-row loss functions take (loss_row_kernels.h), the
// parallel loop over the rows of a loss op, and the small helpers of a row.
#pragma once

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cstdint>
#include <cstring>

#include "common/checks.h"
#include "convert.h"

namespace fastbound {
namespace cpu {

// A gradient of this many bytes or more has its zero rows (the positions that do not
// contribute: 60% of an MDLM or absorbing-SEDD gradient) written with non-temporal
// stores, which write a line without first reading it (an ordinary store's read for
// ownership doubles their traffic): it is larger than the caches, so the backward that
// reads it finds it in memory either way. The DCE's 16-bit rows are streamed too
// (row_rescale); rows that the exp pass writes as it goes are not (through a staging row in
// L1 the uniform graph took 1.27-1.38x the time). Measured on the 2-core Xeon host,
// 4 x 512 x 32769 forward+backward, alternating with ordinary stores: absorbing DSE
// 0.81x (fp32) / 0.84x (bf16), DCE 0.88x / 0.83x.
constexpr int64_t kStreamBytes = int64_t(32) << 20;
constexpr int64_t kStreamRowBytes = 1024;  // shorter rows: ordinary stores

// One row of a loss kernel: pointers already offset to the row.
template <typename scalar_t, typename acc_t>
struct LossRow {
  const scalar_t* score;  // V scores
  scalar_t* grad;         // V gradient entries, or nullptr
  int64_t n_cols;         // V
  acc_t sigma;            // total noise (0 for the DCE, which has none)
  int64_t x_t, x0;        // ids at this position
  acc_t scale;            // weight (and 1/count for "mean")
  bool stream = false;    // zero rows by non-temporal stores (kStreamBytes)
};

// Runs row_fn(LossRow) -> loss for every row of a loss op's inputs (already
// checked), in parallel, writing loss[i]; `grad` is null, a fresh (N, V)
// tensor, or &in.score (in place).
template <typename scalar_t, typename acc_t, typename RowFn>
void for_each_row(const LossInputs& in, at::Tensor* grad, at::Tensor& loss, const RowFn& row_fn) {
  const int64_t n = in.score.size(0), v = in.score.size(1);
  const scalar_t* s = in.score.const_data_ptr<scalar_t>();
  scalar_t* g = grad ? grad->mutable_data_ptr<scalar_t>() : nullptr;
  const int64_t s_stride = in.score.stride(0);
  const int64_t g_stride = grad ? grad->stride(0) : 0;
  const bool stream = grad != nullptr && grad->nbytes() >= kStreamBytes;
  const acc_t* sig = in.sigma ? in.sigma->const_data_ptr<acc_t>() : nullptr;
  const acc_t* scl = in.row_scale.const_data_ptr<acc_t>();
  const int64_t* xt = in.x_t.const_data_ptr<int64_t>();
  const int64_t* x0p = in.x0.const_data_ptr<int64_t>();
  acc_t* out = loss.mutable_data_ptr<acc_t>();
  // About 64 KiB of scores per task keeps scheduling overhead negligible.
  const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 14) / std::max<int64_t>(v, 1));
  at::parallel_for(0, n, grain, [&](int64_t begin, int64_t end) {
    RowFn task_fn = row_fn;  // the task's own copy (its memo of per-sigma constants)
    for (int64_t i = begin; i < end; ++i) {
      LossRow<scalar_t, acc_t> row{s + i * s_stride, g ? g + i * g_stride : nullptr, v,
                                   sig ? sig[i] : acc_t(0), xt[i], x0p[i], scl[i], stream};
      out[i] = task_fn(row);
    }
  });
}

// Writes zeros over a row's gradient (positions that do not contribute); with `stream`, a
// row of kStreamRowBytes or more by non-temporal stores between its first and last 16-byte
// boundaries (see kStreamBytes). Every float type's 0 is all zero bits.
template <typename scalar_t>
inline void zero_row(scalar_t* g, int64_t n, bool stream) {
  if (g == nullptr) return;
  const int64_t bytes = n * static_cast<int64_t>(sizeof(scalar_t));
  if (stream && bytes >= kStreamRowBytes) {
    char* begin = reinterpret_cast<char*>(g);
    char* end = begin + bytes;
    char* a = reinterpret_cast<char*>((reinterpret_cast<uintptr_t>(begin) + 15) & ~uintptr_t(15));
    char* b = reinterpret_cast<char*>(reinterpret_cast<uintptr_t>(end) & ~uintptr_t(15));  // a < b
    std::memset(begin, 0, a - begin);
    for (char* q = a; q < b; q += 16) stream_lanes_bits<VecLanes>(q, VecLanes::U{});
    std::memset(b, 0, end - b);
    stream_fence();
    return;
  }
  std::fill(g, g + n, scalar_t(0));
}

// Raises a ValueError naming the argument when an id is outside [0, n).
inline void check_id(int64_t id, int64_t n, const char* name) {
  TORCH_CHECK_VALUE(id >= 0 && id < n, "fastbound: ", name, " contains id ", id, " outside [0, ", n, ")");
}

}  // namespace cpu
}  // namespace fastbound
