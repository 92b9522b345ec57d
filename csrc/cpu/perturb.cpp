// Fused noise sampling x0 -> x_t (fastbound.perturb), CPU kernel; the twin of csrc/cuda/perturb.cu.
//
// Every element draws its Philox words from its own counter (the contract in
// csrc/include/fastbound/philox.h), so the result does not depend on how the
// work is split between threads, and equals the Triton and CUDA kernels' bit
// for bit. Two modes:
//   * Bernoulli: element selected iff (w0 >> 8) < threshold (per row or per
//     element; threshold = ceil(p * 2^24), from the Python layer or, in
//     `perturb_level`, from the noise level here);
//   * exact-k: in each row, the num_masked[row] maskable elements with the
//     smallest (w0, column) keys, found by a bucket select (average O(L), no sort).
// A selected element becomes mask_id (absorbing graph) or the token
// floor(w1 * V / 2^32) (uniform graph); `mask` records the selection.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <optional>
#include <tuple>
#include <vector>

#include "fastbound/elementwise.h"
#include "fastbound/philox.h"
#include "common/checks.h"
#include "continuous_words.h"
#include "vectorize.h"

namespace fastbound {
namespace cpu {
namespace {

constexpr int64_t kTile = 512;        // elements per tile: their words stay in L1
constexpr int64_t kMinPerThread = 16384;  // below this, one thread (OpenMP start-up costs more)

// The Bernoulli thresholds as the kernel reads them: int32 (B or 1, L or 1) with unit column stride.
struct Thresholds {
  const int32_t* data;
  int64_t row_stride;  // 0: one row of thresholds for every row
  bool per_token;
};

Thresholds thresholds_of(const at::Tensor& threshold) {
  return {threshold.const_data_ptr<int32_t>(), threshold.size(0) == 1 ? 0 : threshold.stride(0),
          threshold.size(1) != 1};
}

struct NoiseArgs {
  uint64_t seed, offset;
  uint32_t vocab;   // V: uniform replacements lie in [0, V); x0 must too
  int64_t mask_id;  // the absorbing replacement
  bool uniform;     // graph: uniform (else absorbing)
};

// w0 and w1 of the elements with flat indices first .. first + n - 1, from continuous_words.h's
// AVX-512 / AVX2 Philox. (philox.h's host loop, which GCC 12 vectorises into 64-bit lanes
// multiplied by the slow vpmullq, took 2.9 ns an element on an AVX-512 Xeon; with these words
// the kernel's 4x512-token call went from 10.0 to 6.8 us.)
void tile_words(uint64_t seed, uint64_t offset, uint64_t first, int64_t n, uint32_t* w0, uint32_t* w1) {
  philox_tile_words(seed, offset + first, n, w0, w1, nullptr);
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
void bernoulli_rows(const id_t* x0, id_t* x_t, uint8_t* mask, const uint8_t* maskable, const Thresholds& thr,
                    int64_t rows, int64_t cols, const NoiseArgs& a) {
  const int64_t tiles_per_row = (cols + kTile - 1) / kTile;
  const int64_t grain = std::max<int64_t>(1, kMinPerThread / std::max<int64_t>(1, std::min(cols, kTile)));
  at::parallel_for(0, rows * tiles_per_row, grain, [&](int64_t begin, int64_t end) {
    uint32_t w0[kTile], w1[kTile];
    uint8_t sel[kTile], ones[kTile];
    std::fill_n(ones, kTile, uint8_t{1});
    for (int64_t task = begin; task < end; ++task) {
      const int64_t row = task / tiles_per_row, col = (task % tiles_per_row) * kTile;
      const int64_t n = std::min(kTile, cols - col), first = row * cols + col;
      tile_words(a.seed, a.offset, static_cast<uint64_t>(first), n, w0, w1);
      const int32_t* t = thr.data + row * thr.row_stride + (thr.per_token ? col : 0);
      const uint8_t* m = maskable != nullptr ? maskable + first : ones;
      if (thr.per_token) {
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
    std::vector<uint32_t> w0(cols), w1(cols);
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
        tile_words(a.seed, a.offset, static_cast<uint64_t>(first + col), std::min(kTile, cols - col), w0.data() + col,
                   w1.data() + col);
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

// x_t and mask of the contiguous (B, L) ids x0: Bernoulli with `thr`, else exact-k with `num_masked`.
std::tuple<at::Tensor, at::Tensor> corrupt(const at::Tensor& x0, const Thresholds* thr, const int64_t* num_masked,
                                           const uint8_t* maskable, const NoiseArgs& a) {
  at::Tensor x_t = at::empty_like(x0);
  at::Tensor mask = at::empty(x0.sizes(), x0.options().dtype(at::kBool));
  const int64_t rows = x0.size(0), cols = x0.size(1);
  if (x0.numel() == 0) return {x_t, mask};
  AT_DISPATCH_INTEGRAL_TYPES(x0.scalar_type(), "perturb_cpu", [&] {
    const scalar_t* in = x0.const_data_ptr<scalar_t>();
    scalar_t* out = x_t.mutable_data_ptr<scalar_t>();
    uint8_t* mk = reinterpret_cast<uint8_t*>(mask.mutable_data_ptr<bool>());
    if (thr != nullptr) {
      if (a.uniform) {
        bernoulli_rows<scalar_t, true>(in, out, mk, maskable, *thr, rows, cols, a);
      } else {
        bernoulli_rows<scalar_t, false>(in, out, mk, maskable, *thr, rows, cols, a);
      }
    } else if (a.uniform) {
      exact_k_rows<scalar_t, true>(in, out, mk, maskable, num_masked, rows, cols, a);
    } else {
      exact_k_rows<scalar_t, false>(in, out, mk, maskable, num_masked, rows, cols, a);
    }
  });
  return {x_t, mask};
}

// bool tensors hold one byte per element, 0 or 1.
const uint8_t* mask_bytes(const at::Tensor& maskable) {
  return maskable.defined() ? reinterpret_cast<const uint8_t*>(maskable.const_data_ptr<bool>()) : nullptr;
}

NoiseArgs noise_args(int64_t vocab_size, int64_t mask_id, int64_t graph, int64_t seed, int64_t offset) {
  return {static_cast<uint64_t>(seed), static_cast<uint64_t>(offset), static_cast<uint32_t>(vocab_size), mask_id,
          graph == kGraphUniform};
}

std::tuple<at::Tensor, at::Tensor> perturb(const at::Tensor& x0, const std::optional<at::Tensor>& threshold,
                                           const std::optional<at::Tensor>& num_masked,
                                           const std::optional<at::Tensor>& maskable, int64_t vocab_size,
                                           int64_t mask_id, int64_t graph, int64_t seed, int64_t offset) {
  check_perturb_inputs(x0, threshold, num_masked, maskable, vocab_size, graph);
  const NoiseArgs a = noise_args(vocab_size, mask_id, graph, seed, offset);
  const uint8_t* m = mask_bytes(maskable.value_or(at::Tensor()));
  if (threshold.has_value()) {
    const Thresholds thr = thresholds_of(*threshold);
    return corrupt(x0, &thr, nullptr, m, a);
  }
  return corrupt(x0, nullptr, num_masked->const_data_ptr<int64_t>(), m, a);
}

// ---- perturb_level: `fastbound.perturb`'s common eager CPU call (fastbound/noise.py `_fast_key`)
//
// The Python layer's `_threshold` and the kernel in one op: a call of 4x512 tokens costs about
// as much in the torch ops and Python around the kernel as in the kernel itself.

constexpr int64_t kFewLevels = 64;  // `fastbound.noise.SMALL_HOST_VALUES`
constexpr double kUniformScale = 16777216.0;  // 2^24: threshold = ceil(p * 2^24) (philox.h)

// σ finite and >= 0, or λ in [0, 1] (NaN is neither): `fastbound.noise._in_range`.
bool level_in_range(bool is_sigma, double value) {
  return is_sigma ? value >= 0 && value < std::numeric_limits<double>::infinity() : value >= 0 && value <= 1;
}

void check_levels(bool is_sigma, const double* values, int64_t n) {
  TORCH_CHECK_VALUE(std::all_of(values, values + n, [&](double x) { return level_in_range(is_sigma, x); }),
                    is_sigma ? "sigma must be finite and >= 0 everywhere" : "mask_ratio must lie in [0, 1] everywhere");
}

// The thresholds `_threshold` gives a level tensor (sigma if is_sigma, else mask_ratio), bit for
// bit, after its range check (the same ValueError). `level` is (B or 1, L or 1). Up to
// kFewLevels values are formed as `_threshold` forms them, as Python floats: p = -expm1(-σ) from
// libm's expm1 (Python's math.expm1), written to `few`. More values take its torch ops, written
// to `many`: ATen's expm1 kernel is vectorised (SLEEF) and differs from libm's in the last bit of
// some values, so only the same ops on the same contiguous float64 tensor give the same p.
Thresholds level_thresholds(const at::Tensor& level, bool is_sigma, int32_t* few, at::Tensor& many) {
  const int64_t rows = level.size(0), cols = level.size(1), n = rows * cols;
  const int64_t row_stride = rows == 1 ? 0 : cols;
  if (n > kFewLevels) {
    at::Tensor p = level.to(at::kDouble, /*non_blocking=*/false, /*copy=*/true, at::MemoryFormat::Contiguous);
    check_levels(is_sigma, p.const_data_ptr<double>(), n);
    if (is_sigma) p.neg_().expm1_().neg_();
    // Checked: p lies in [0, 1], where `_threshold`'s nan_to_num and clamp change nothing.
    many = p.mul_(kUniformScale).ceil_().to(at::kInt);
    return {many.const_data_ptr<int32_t>(), row_stride, cols != 1};
  }
  double values[kFewLevels];
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, level.scalar_type(), "perturb_level", [&] {
    const scalar_t* v = level.const_data_ptr<scalar_t>();
    const int64_t s0 = level.stride(0), s1 = level.stride(1);
    for (int64_t r = 0; r < rows; ++r) {
      for (int64_t c = 0; c < cols; ++c) values[r * cols + c] = static_cast<double>(v[r * s0 + c * s1]);
    }
  });
  check_levels(is_sigma, values, n);
  for (int64_t i = 0; i < n; ++i) {
    few[i] = static_cast<int32_t>(std::ceil((is_sigma ? -std::expm1(-values[i]) : values[i]) * kUniformScale));
  }
  return {few, row_stride, cols != 1};
}

// `_per_position`'s view of a level tensor for ids of shape (rows, cols) (one_row: x0 was (L,)).
at::Tensor level_view(const at::Tensor& level, bool one_row, int64_t rows, int64_t cols) {
  TORCH_CHECK(at::isFloatingType(level.scalar_type()), "fastbound.perturb_level: level must be a float tensor");
  at::Tensor view = level.dim() == 0 ? level.view({1, 1}) : level.dim() == 1 ? level.unsqueeze(one_row ? 0 : 1) : level;
  TORCH_CHECK(view.dim() == 2 && (view.size(0) == 1 || view.size(0) == rows) &&
                  (view.size(1) == 1 || view.size(1) == cols),
              "fastbound.perturb_level: level must broadcast to x0 as (B or 1, L or 1)");
  return view;
}

// Registered for CPU and AutogradCPU alike: the outputs are integers, with nothing to record
// for autograd (sigma may require grad).
std::tuple<at::Tensor, at::Tensor> perturb_level(const at::Tensor& x0, const std::optional<at::Tensor>& level,
                                                 bool is_sigma, int64_t threshold,
                                                 const std::optional<at::Tensor>& maskable, int64_t vocab_size,
                                                 int64_t mask_id, int64_t graph, int64_t seed, int64_t offset) {
  at::AutoDispatchBelowADInplaceOrView guard;
  TORCH_CHECK(x0.dim() == 1 || x0.dim() == 2, "fastbound.perturb_level: x0 must be (B, L) or (L,)");
  const bool one_row = x0.dim() == 1;
  const at::Tensor x = (one_row ? x0.unsqueeze(0) : x0).contiguous();
  const int64_t rows = x.size(0), cols = x.size(1);
  check_perturb_scalars(cols, vocab_size, graph);
  int32_t few[kFewLevels];
  at::Tensor many;
  Thresholds thr{few, 0, false};
  if (level.has_value()) {
    thr = level_thresholds(level_view(*level, one_row, rows, cols), is_sigma, few, many);
  } else {
    TORCH_CHECK(threshold >= 0 && threshold <= static_cast<int64_t>(kUniformScale),
                "fastbound.perturb_level: threshold must lie in [0, 2^24]");
    few[0] = static_cast<int32_t>(threshold);
  }
  at::Tensor m;
  if (maskable.has_value()) {
    TORCH_CHECK(maskable->scalar_type() == at::kBool, "fastbound.perturb_level: maskable must be bool");
    m = maskable->expand(x0.sizes()).contiguous().view({rows, cols});
  }
  auto [x_t, mask] = corrupt(x, &thr, nullptr, mask_bytes(m), noise_args(vocab_size, mask_id, graph, seed, offset));
  if (one_row) return {x_t.view(x0.sizes()), mask.view(x0.sizes())};
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
  m.impl("perturb_level", &perturb_level);
  m.impl("philox4x32", &philox4x32);
}

TORCH_LIBRARY_IMPL(fastbound, AutogradCPU, m) { m.impl("perturb_level", &perturb_level); }

}  // namespace cpu
}  // namespace fastbound
