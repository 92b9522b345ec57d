// Device building blocks of the CUDA row code (the twin of csrc/cpu/loss_rows.h),
// used by the per-row loss functors (loss_row_kernels.cuh) and so by the loss
// kernels (losses.cu) and the integration step (integrate.cu).
//
// A row of V scores is handled by a group of threads: a whole block when V is
// large, one warp when V is small (several groups per block). Each thread walks
// the row with 16-byte vector loads where the row pointer allows it, keeps
// per-thread partial sums in the accumulation type, and the group combines
// them with warp shuffles (and shared memory across the warps of a block).
// Every index is int64, so rows of any length at any offset are addressed
// without overflow.
//
// Everything a row does is `__host__ __device__` and templated on the group
// (its rank, size, sync and allreduce), so tests/cuda_sim/ can run the same
// row code on the CPU with a group of std::threads.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>

#include "fastbound/elementwise.h"
#include "losses.h"

namespace fastbound {
namespace gpu {

// ---------------------------------------------------------------------------
// Element conversions
// ---------------------------------------------------------------------------
FB_HD float to_acc(float x) { return x; }
FB_HD double to_acc(double x) { return x; }
FB_HD float to_acc(__half x) { return __half2float(x); }
FB_HD float to_acc(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename scalar_t>
FB_HD scalar_t from_acc(acc_type<scalar_t> x);
template <>
FB_HD float from_acc<float>(float x) { return x; }
template <>
FB_HD double from_acc<double>(double x) { return x; }
template <>
FB_HD __half from_acc<__half>(float x) { return __float2half_rn(x); }
template <>
FB_HD __nv_bfloat16 from_acc<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

template <typename acc_t>
FB_HD acc_t quiet_nan() {
  return acc_t(NAN);
}

template <typename acc_t>
FB_HD acc_t neg_inf() {
  return -acc_t(INFINITY);
}

// ---------------------------------------------------------------------------
// Reductions
// ---------------------------------------------------------------------------
// Two accumulators reduced together: (sum e^s, sum s) or (max, sum e^{s-max}).
template <typename acc_t>
struct Pair {
  acc_t a;
  acc_t b;
};

template <typename acc_t>
struct AddPairs {
  FB_HD Pair<acc_t> operator()(Pair<acc_t> x, Pair<acc_t> y) const {
    return {x.a + y.a, x.b + y.b};
  }
};

// Merges two online log-sum-exp states (a = running max, b = sum e^{s - a}).
// A state that saw no finite score has a = -inf and contributes nothing but a
// NaN it may carry in b.
template <typename acc_t>
struct MergeLogSumExp {
  FB_HD Pair<acc_t> operator()(Pair<acc_t> x, Pair<acc_t> y) const {
    if (y.a > x.a) {
      const Pair<acc_t> t = x;
      x = y;
      y = t;
    }
    const acc_t w = y.a == neg_inf<acc_t>() ? acc_t(0) : exp_acc(y.a - x.a);
    return {x.a, x.b + y.b * w};
  }
};

// Every lane of the warp gets the combination of all 32 lanes' values.
template <typename acc_t, typename Op>
__device__ __forceinline__ Pair<acc_t> warp_allreduce(Pair<acc_t> v, Op op) {
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) {
    const Pair<acc_t> other{__shfl_xor_sync(0xffffffffu, v.a, offset), __shfl_xor_sync(0xffffffffu, v.b, offset)};
    v = op(v, other);
  }
  return v;
}

// ---------------------------------------------------------------------------
// Thread groups that own one row
// ---------------------------------------------------------------------------
// A group works on items (a row of a loss, a chunk of rows of the integration
// step) with a grid stride: first_item(), then every items_per_grid().
//
// One warp per item, blockDim.x / 32 items per block. Control flow may differ
// between the warps of a block, so only warp-level synchronisation is used.
struct WarpPerRow {
  __device__ int rank() const { return threadIdx.x & 31; }
  __device__ int size() const { return 32; }
  __device__ int64_t first_item() const { return int64_t(blockIdx.x) * (blockDim.x >> 5) + (threadIdx.x >> 5); }
  __device__ int64_t items_per_grid() const { return int64_t(gridDim.x) * (blockDim.x >> 5); }
  __device__ void sync() const { __syncwarp(); }
  template <typename acc_t, typename Op>
  __device__ Pair<acc_t> allreduce(Pair<acc_t> v, Op op) const {
    return warp_allreduce(v, op);
  }
};

// One block per item. blockDim.x must be a multiple of 32, at most 1024. Every
// thread of the block walks the same items, so block barriers are safe.
struct BlockPerRow {
  __device__ int rank() const { return threadIdx.x; }
  __device__ int size() const { return blockDim.x; }
  __device__ int64_t first_item() const { return blockIdx.x; }
  __device__ int64_t items_per_grid() const { return gridDim.x; }
  __device__ void sync() const { __syncthreads(); }
  template <typename acc_t, typename Op>
  __device__ Pair<acc_t> allreduce(Pair<acc_t> v, Op op) const {
    __shared__ Pair<acc_t> per_warp[32];
    v = warp_allreduce(v, op);
    if ((threadIdx.x & 31) == 0) per_warp[threadIdx.x >> 5] = v;
    __syncthreads();
    v = per_warp[0];
    for (int w = 1; w < int(blockDim.x >> 5); ++w) v = op(v, per_warp[w]);
    __syncthreads();  // per_warp may be rewritten by the next reduction
    return v;
  }
};

// ---------------------------------------------------------------------------
// Walking a row
// ---------------------------------------------------------------------------
template <typename scalar_t>
struct alignas(16) Pack {
  static constexpr int kSize = 16 / sizeof(scalar_t);
  scalar_t v[kSize];
};

// Elements before the first 16-byte boundary of `p`, or -1 when `p` is not
// aligned to its element size (then no vector access is possible).
template <typename scalar_t>
FB_HD int64_t elements_to_alignment(const scalar_t* p) {
  const auto address = reinterpret_cast<uintptr_t>(p);
  if (address % sizeof(scalar_t) != 0) return -1;
  return int64_t((16 - address % 16) % 16 / sizeof(scalar_t));
}

// Calls f(i, s[i]) once for every column i of a row (s[i] converted to acc_t)
// and, when g is not null, stores the result in g[i]. Each element is read and
// then written by the same thread, so g may be s (in place). The row is split
// into a scalar head up to a 16-byte boundary, 16-byte packs, and a scalar
// tail; when s and g are not equally aligned everything is scalar.
template <typename scalar_t, typename Group, typename F>
FB_HD void for_each_column(const Group& group, const scalar_t* s, scalar_t* g, int64_t n, F& f) {
  using Vec = Pack<scalar_t>;
  const int64_t head_s = elements_to_alignment(s);
  const bool vector_ok = head_s >= 0 && (g == nullptr || elements_to_alignment<scalar_t>(g) == head_s);
  const int64_t head = vector_ok ? (head_s < n ? head_s : n) : n;
  const int64_t n_packs = (n - head) / Vec::kSize;
  const int64_t tail = head + n_packs * Vec::kSize;
  auto scalar = [&](int64_t i) {
    const auto out = f(i, to_acc(s[i]));
    if (g != nullptr) g[i] = from_acc<scalar_t>(out);
  };
  for (int64_t i = group.rank(); i < head; i += group.size()) scalar(i);
  const Vec* s_packs = reinterpret_cast<const Vec*>(s + head);
  Vec* g_packs = g != nullptr ? reinterpret_cast<Vec*>(g + head) : nullptr;
  for (int64_t p = group.rank(); p < n_packs; p += group.size()) {
    const Vec in = s_packs[p];
    Vec out;
#pragma unroll
    for (int k = 0; k < Vec::kSize; ++k) {
      out.v[k] = from_acc<scalar_t>(f(head + p * Vec::kSize + k, to_acc(in.v[k])));
    }
    if (g_packs != nullptr) g_packs[p] = out;
  }
  for (int64_t i = tail + group.rank(); i < n; i += group.size()) scalar(i);
}

// Writes `value` over the n entries of a gradient row (nothing when g is null).
template <typename scalar_t, typename Group>
FB_HD void fill_row(const Group& group, scalar_t* g, int64_t n, acc_type<scalar_t> value) {
  if (g == nullptr) return;
  using Vec = Pack<scalar_t>;
  const scalar_t x = from_acc<scalar_t>(value);
  const int64_t head_g = elements_to_alignment(g);
  const int64_t head = head_g >= 0 && head_g < n ? head_g : n;
  const int64_t n_packs = (n - head) / Vec::kSize;
  const int64_t tail = head + n_packs * Vec::kSize;
  Vec pack;
#pragma unroll
  for (int k = 0; k < Vec::kSize; ++k) pack.v[k] = x;
  for (int64_t i = group.rank(); i < head; i += group.size()) g[i] = x;
  Vec* g_packs = reinterpret_cast<Vec*>(g + head);
  for (int64_t p = group.rank(); p < n_packs; p += group.size()) g_packs[p] = pack;
  for (int64_t i = tail + group.rank(); i < n; i += group.size()) g[i] = x;
}

// The streaming pass every loss is built from. For every column i != skip it
// accumulates sum e^{s_i - shift} and sum s_i and returns the gradient
//   g_i = g_scale * e^{s_i - shift} + g_offset + [i == x0] * x0_term;
// column `skip` (none when skip < 0) is left out of the sums and gets g = 0.
template <typename acc_t>
struct ExpPass {
  int64_t skip, x0;
  acc_t shift, g_scale, g_offset, x0_term;
  acc_t sum_exp = 0, sum_score = 0;

  FB_HD ExpPass(int64_t skip_, int64_t x0_, acc_t shift_, acc_t g_scale_, acc_t g_offset_, acc_t x0_term_)
      : skip(skip_), x0(x0_), shift(shift_), g_scale(g_scale_), g_offset(g_offset_), x0_term(x0_term_) {}

  FB_HD acc_t operator()(int64_t i, acc_t s) {
    if (i == skip) return acc_t(0);
    const acc_t e = exp_acc(s - shift);
    sum_exp += e;
    sum_score += s;
    return g_scale * e + g_offset + (i == x0 ? x0_term : acc_t(0));
  }
};

// Online log-sum-exp over the columns i != skip, in one read: keeps the
// running maximum m and sum e^{s_i - m}, rescaling the sum when m grows
// (Milakov & Gimelshein 2018, "Online normalizer calculation for softmax").
// A NaN score makes the sum NaN; -inf scores contribute nothing.
template <typename acc_t>
struct OnlineLogSumExp {
  int64_t skip;
  acc_t running_max = neg_inf<acc_t>(), sum = 0;

  FB_HD explicit OnlineLogSumExp(int64_t skip_) : skip(skip_) {}

  FB_HD acc_t operator()(int64_t i, acc_t s) {
    if (i != skip) {
      if (s > running_max) {
        sum = sum * exp_acc(running_max - s) + acc_t(1);
        running_max = s;
      } else if (s != neg_inf<acc_t>()) {
        sum += exp_acc(s - running_max);
      }
    }
    return acc_t(0);
  }
};

// ---------------------------------------------------------------------------
// Rows
// ---------------------------------------------------------------------------
// One row of a loss: pointers already offset to the row.
template <typename scalar_t>
struct LossRow {
  const scalar_t* score;  // V scores
  scalar_t* grad;         // V gradient entries, or nullptr
  int64_t n_cols;         // V
  acc_type<scalar_t> sigma;  // total noise (0 for the DCE, which has none)
  int64_t x_t, x0;           // ids at this position
  acc_type<scalar_t> scale;  // weight (and 1/count for "mean")
};

// Finishes a row that does not run the loss: every gradient entry `value`,
// and returns `value` as the row's loss (0, or NaN for a bad id).
template <typename scalar_t, typename Group>
FB_HD acc_type<scalar_t> finish_row(const Group& group, const LossRow<scalar_t>& row, acc_type<scalar_t> value) {
  fill_row(group, row.grad, row.n_cols, value);
  return value;
}

// ---------------------------------------------------------------------------
// Launching
// ---------------------------------------------------------------------------
constexpr int64_t kWarpPerRowMaxCols = 1024;  // up to 32 elements per lane
constexpr int kWarpPerRowThreads = 256;       // 8 warps per block
constexpr int kMaxThreads = 512;              // the largest block any row kernel is launched with
constexpr int64_t kMaxBlocks = int64_t(1) << 20;

// Rows of at most kWarpPerRowMaxCols columns are handled by a warp, longer ones by a block.
inline bool warp_per_row(int64_t n_cols) { return n_cols <= kWarpPerRowMaxCols; }

// Block size for one block per row: enough threads that each handles a few
// 16-byte packs.
inline int block_threads(int64_t n_cols) {
  if (n_cols <= 4096) return 128;
  if (n_cols <= 16384) return 256;
  return kMaxThreads;
}

// Calls launch(Group{}, grid, threads) with the group type and launch shape
// for n_items items of rows of n_cols columns; the grid is capped (each group
// walks items with a grid stride), so any number of items fits.
template <typename LaunchFn>
cudaError_t launch_groups(int64_t n_items, int64_t n_cols, LaunchFn&& launch) {
  if (n_items <= 0) return cudaSuccess;
  if (warp_per_row(n_cols)) {
    const int64_t groups_per_block = kWarpPerRowThreads / 32;
    const int64_t blocks = (n_items + groups_per_block - 1) / groups_per_block;
    launch(WarpPerRow{}, static_cast<unsigned>(blocks < kMaxBlocks ? blocks : kMaxBlocks), kWarpPerRowThreads);
  } else {
    launch(BlockPerRow{}, static_cast<unsigned>(n_items < kMaxBlocks ? n_items : kMaxBlocks), block_threads(n_cols));
  }
  return cudaGetLastError();
}

}  // namespace gpu
}  // namespace fastbound
