// Fused noise sampling x0 -> x_t (fastbound.perturb), CPU kernel; the twin of csrc/cuda/perturb.cu.
//
// Every element draws its Philox words from its own counter (the contract in
// csrc/include/fastbound/philox.h), so the result does not depend on how the
// work is split between threads, and equals the Triton and CUDA kernels' bit
// for bit. Two modes:
//   * Bernoulli: element selected iff (w0 >> 8) < threshold (per row or per
//     element; the Python layer computes threshold = ceil(p * 2^24));
//   * exact-k: in each row, the num_masked[row] maskable elements with the
//     smallest (w0, column) keys, found by a bucket select (average O(L), no sort).
// A selected element becomes mask_id (absorbing graph) or the token
// floor(w1 * V / 2^32) (uniform graph); `mask` records the selection.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <algorithm>
#include <optional>
#include <tuple>
#include <vector>

#include "fastbound/elementwise.h"
#include "fastbound/philox.h"
#include "common/checks.h"
#include "vectorize.h"

namespace fastbound {
namespace cpu {
namespace {

constexpr int64_t kTile = 512;        // elements per tile: their words stay in L1
constexpr int64_t kMinPerThread = 16384;  // below this, one thread (OpenMP start-up costs more)

struct NoiseArgs {
  uint64_t seed, offset;
  uint32_t vocab;   // V: uniform replacements lie in [0, V); x0 must too
  int64_t mask_id;  // the absorbing replacement
  bool uniform;     // graph: uniform (else absorbing)
};

// w0 (and, for kTokens, w1) of the elements with flat indices first .. first + n - 1.
template <bool kTokens>
FB_CPU_CLONES void tile_words(uint64_t seed, uint64_t offset, uint64_t first, int64_t n, uint32_t* w0,
                              uint32_t* w1) {
  for (int64_t j = 0; j < n; ++j) {
    const philox::Words w = philox::element_words(seed, offset, first + static_cast<uint64_t>(j));
    w0[j] = w.w0;
    if (kTokens) w1[j] = w.w1;
  }
}

// sel[j] = (w0[j] >> 8) < threshold[j or 0] and maskable[j]. Masks are bytes holding 0 or 1
// (torch's bool layout), handled as uint8_t so the loops vectorise.
template <bool kPerToken>
FB_CPU_CLONES void bernoulli_tile(const uint32_t* w0, const int32_t* threshold, const uint8_t* maskable,
                                  int64_t n, uint8_t* sel) {
  for (int64_t j = 0; j < n; ++j) {
    const uint32_t t = static_cast<uint32_t>(threshold[kPerToken ? j : 0]);
    sel[j] = static_cast<uint8_t>(philox::bernoulli(w0[j], t)) & maskable[j];
  }
}

// Writes x_t and mask from the selection; returns whether some x0 lies outside [0, V).
template <typename id_t, bool kUniform>
FB_CPU_CLONES bool write_tile(const id_t* x0, id_t* x_t, uint8_t* mask, const uint8_t* sel, const uint32_t* w1,
                              int64_t n, uint32_t vocab, id_t mask_id) {
  int bad = 0;
  for (int64_t j = 0; j < n; ++j) {
    const id_t x = x0[j];
    const id_t replacement = kUniform ? static_cast<id_t>(philox::uniform_below(w1[j], vocab)) : mask_id;
    bad |= static_cast<int>(x < 0) | static_cast<int>(static_cast<int64_t>(x) >= static_cast<int64_t>(vocab));
    x_t[j] = sel[j] ? replacement : x;
    mask[j] = sel[j];
  }
  return bad != 0;
}

template <typename id_t>
[[noreturn]] void report_bad_id(const id_t* x0, int64_t n, uint32_t vocab) {
  for (int64_t j = 0; j < n; ++j) {
    const int64_t v = static_cast<int64_t>(x0[j]);
    TORCH_CHECK_VALUE(v >= 0 && v < vocab, "fastbound.perturb: x0 contains id ", v, " outside [0, ", vocab, ")");
  }
  TORCH_CHECK(false, "fastbound.perturb: internal error locating an out-of-range id");
}

template <typename id_t, bool kUniform>
void write_checked(const id_t* x0, id_t* x_t, uint8_t* mask, const uint8_t* sel, const uint32_t* w1, int64_t n,
                   const NoiseArgs& a) {
  if (write_tile<id_t, kUniform>(x0, x_t, mask, sel, w1, n, a.vocab, static_cast<id_t>(a.mask_id))) {
    report_bad_id(x0, n, a.vocab);
  }
}

// Bernoulli mode over (rows, cols), parallel over (row, tile) tasks.
template <typename id_t, bool kUniform>
void bernoulli_rows(const id_t* x0, id_t* x_t, uint8_t* mask, const uint8_t* maskable, const at::Tensor& threshold,
                    int64_t rows, int64_t cols, const NoiseArgs& a) {
  const int32_t* thr = threshold.const_data_ptr<int32_t>();
  const int64_t thr_row_stride = threshold.size(0) == 1 ? 0 : threshold.stride(0);
  const bool per_token = threshold.size(1) != 1;
  const int64_t tiles_per_row = (cols + kTile - 1) / kTile;
  const int64_t grain = std::max<int64_t>(1, kMinPerThread / std::max<int64_t>(1, std::min(cols, kTile)));
  at::parallel_for(0, rows * tiles_per_row, grain, [&](int64_t begin, int64_t end) {
    uint32_t w0[kTile], w1[kTile];
    uint8_t sel[kTile], ones[kTile];
    std::fill_n(ones, kTile, uint8_t{1});
    for (int64_t task = begin; task < end; ++task) {
      const int64_t row = task / tiles_per_row, col = (task % tiles_per_row) * kTile;
      const int64_t n = std::min(kTile, cols - col), first = row * cols + col;
      tile_words<kUniform>(a.seed, a.offset, static_cast<uint64_t>(first), n, w0, w1);
      const int32_t* t = thr + row * thr_row_stride + (per_token ? col : 0);
      const uint8_t* m = maskable != nullptr ? maskable + first : ones;
      if (per_token) {
        bernoulli_tile<true>(w0, t, m, n, sel);
      } else {
        bernoulli_tile<false>(w0, t, m, n, sel);
      }
      write_checked<id_t, kUniform>(x0 + first, x_t + first, mask + first, sel, w1, n, a);
    }
  });
}

// The k-th smallest (w0, column) key among the row's maskable elements, 1 <= k <= their
// number (the caller checks). Bucket select: a histogram of the top kBucketBits of w0
// finds the bucket holding the k-th key, and nth_element orders only that bucket
// (about cols / 2^kBucketBits keys), so a row costs a few linear passes, no sort.
constexpr int kBucketBits = 8;

struct RowSelect {
  std::vector<int64_t> histogram = std::vector<int64_t>(size_t{1} << kBucketBits);
  std::vector<uint64_t> bucket;
};

uint64_t kth_key(const uint32_t* w0, const uint8_t* maskable, int64_t cols, int64_t k, RowSelect& scratch) {
  constexpr int kShift = 32 - kBucketBits;
  std::fill(scratch.histogram.begin(), scratch.histogram.end(), 0);
  for (int64_t col = 0; col < cols; ++col) {
    scratch.histogram[w0[col] >> kShift] += maskable == nullptr || maskable[col];
  }
  uint32_t target = 0;
  int64_t below = 0;
  while (below + scratch.histogram[target] < k) below += scratch.histogram[target++];
  scratch.bucket.clear();
  for (int64_t col = 0; col < cols; ++col) {
    if ((w0[col] >> kShift) == target && (maskable == nullptr || maskable[col])) {
      scratch.bucket.push_back(philox::rank_key(w0[col], static_cast<uint32_t>(col)));
    }
  }
  const auto nth = scratch.bucket.begin() + (k - below - 1);
  std::nth_element(scratch.bucket.begin(), nth, scratch.bucket.end());
  return *nth;
}

// Exact-k mode: per row, the k maskable elements with the smallest (w0, column) keys.
template <typename id_t, bool kUniform>
void exact_k_rows(const id_t* x0, id_t* x_t, uint8_t* mask, const uint8_t* maskable, const int64_t* num_masked,
                  int64_t rows, int64_t cols, const NoiseArgs& a) {
  const int64_t grain = std::max<int64_t>(1, kMinPerThread / std::max<int64_t>(1, cols));
  at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
    std::vector<uint32_t> w0(cols), w1(kUniform ? cols : 0);
    std::vector<uint8_t> sel(cols);
    RowSelect scratch;
    for (int64_t row = begin; row < end; ++row) {
      const int64_t first = row * cols;
      const uint8_t* m = maskable != nullptr ? maskable + first : nullptr;
      const int64_t available = m == nullptr ? cols : std::count(m, m + cols, uint8_t{1});
      const int64_t k = num_masked[row];
      TORCH_CHECK_VALUE(k >= 0 && k <= available, "fastbound.perturb: num_masked[", row, "] = ", k,
                        " is outside [0, ", available, "], the number of maskable positions of row ", row);
      for (int64_t col = 0; col < cols; col += kTile) {
        tile_words<kUniform>(a.seed, a.offset, static_cast<uint64_t>(first + col), std::min(kTile, cols - col),
                             w0.data() + col, kUniform ? w1.data() + col : nullptr);
      }
      if (k == 0) {
        std::fill(sel.begin(), sel.end(), uint8_t{0});
      } else {
        const uint64_t kth = kth_key(w0.data(), m, cols, k, scratch);
        for (int64_t col = 0; col < cols; ++col) {
          sel[col] = (m == nullptr || m[col]) && philox::rank_key(w0[col], static_cast<uint32_t>(col)) <= kth;
        }
      }
      write_checked<id_t, kUniform>(x0 + first, x_t + first, mask + first, sel.data(), w1.data(), cols, a);
    }
  });
}

std::tuple<at::Tensor, at::Tensor> perturb(const at::Tensor& x0, const std::optional<at::Tensor>& threshold,
                                           const std::optional<at::Tensor>& num_masked,
                                           const std::optional<at::Tensor>& maskable, int64_t vocab_size,
                                           int64_t mask_id, int64_t graph, int64_t seed, int64_t offset) {
  check_perturb_inputs(x0, threshold, num_masked, maskable, vocab_size, graph);
  at::Tensor x_t = at::empty_like(x0);
  at::Tensor mask = at::empty(x0.sizes(), x0.options().dtype(at::kBool));
  const int64_t rows = x0.size(0), cols = x0.size(1);
  if (x0.numel() == 0) return {x_t, mask};
  const NoiseArgs a{static_cast<uint64_t>(seed), static_cast<uint64_t>(offset), static_cast<uint32_t>(vocab_size),
                    mask_id, graph == kGraphUniform};
  // bool tensors hold one byte per element, 0 or 1.
  const uint8_t* m =
      maskable.has_value() ? reinterpret_cast<const uint8_t*>(maskable->const_data_ptr<bool>()) : nullptr;
  AT_DISPATCH_INTEGRAL_TYPES(x0.scalar_type(), "perturb_cpu", [&] {
    const scalar_t* in = x0.const_data_ptr<scalar_t>();
    scalar_t* out = x_t.mutable_data_ptr<scalar_t>();
    uint8_t* mk = reinterpret_cast<uint8_t*>(mask.mutable_data_ptr<bool>());
    if (threshold.has_value()) {
      if (a.uniform) {
        bernoulli_rows<scalar_t, true>(in, out, mk, m, *threshold, rows, cols, a);
      } else {
        bernoulli_rows<scalar_t, false>(in, out, mk, m, *threshold, rows, cols, a);
      }
    } else {
      const int64_t* k = num_masked->const_data_ptr<int64_t>();
      if (a.uniform) {
        exact_k_rows<scalar_t, true>(in, out, mk, m, k, rows, cols, a);
      } else {
        exact_k_rows<scalar_t, false>(in, out, mk, m, k, rows, cols, a);
      }
    }
  });
  return {x_t, mask};
}

// The raw generator, for known-answer tests and the time samplers: out[i, j] =
// word j of Philox4x32-10(counter[i, 0..3] mod 2^32, key = seed split as in philox.h).
at::Tensor philox4x32(const at::Tensor& counter, int64_t seed) {
  TORCH_CHECK(counter.dim() == 2 && counter.size(1) == 4 && counter.scalar_type() == at::kLong,
              "fastbound.philox4x32: counter must be int64 (N, 4)");
  const at::Tensor c = counter.contiguous();
  at::Tensor out = at::empty_like(c);
  const int64_t* in = c.const_data_ptr<int64_t>();
  int64_t* o = out.mutable_data_ptr<int64_t>();
  const uint64_t key = static_cast<uint64_t>(seed);
  at::parallel_for(0, c.size(0), kMinPerThread, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) philox::counter_row_words(in + 4 * i, o + 4 * i, key);
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastbound, CPU, m) {
  m.impl("perturb", &perturb);
  m.impl("philox4x32", &philox4x32);
}

}  // namespace cpu
}  // namespace fastbound
