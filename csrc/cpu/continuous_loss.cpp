// The continuous denoising loss and integration step, CPU kernels.
//
// Both are one pass over eps_hat (and eps, or eps regenerated from its Philox
// counters, continuous.h) that sums (eps - eps_hat)^2 per sample:
//   continuous_denoising_loss:  loss_b = 0.5 scale_b sum_i (eps - eps_hat)^2 and, when
//     need_grad, grad = scale_b (eps_hat - eps) written in the same pass;
//   continuous_integrate_step:  S_b = weight_b (sum_i (eps - eps_hat)^2 - baseline_b),
//     acc[index_b] += (S_b, S_b^2), no gradient.
// A row is cut into fixed chunks, each summed in the compute type (float32, float64
// for float64 input) for the loss and in float64 for the integration step; the chunk
// sums are added in float64 in chunk order, and the accumulator rows are updated
// serially in sample order, so the results do not depend on the number of threads.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <optional>
#include <tuple>
#include <type_traits>
#include <vector>

#include "buffer_pool.h"
#include "continuous_lanes.h"
#include "continuous_words.h"
#include "convert.h"
#include "fastbound/continuous.h"
#include "common/continuous_checks.h"
#include "vectorize.h"

#if defined(__x86_64__)
#include <immintrin.h>
#endif

namespace fastbound {
namespace cpu {
namespace {

constexpr int64_t kChunk = 4096;  // elements per task; a multiple of kTile
constexpr int64_t kTile = 512;    // regenerated eps per tile, kept in L1
constexpr int64_t kMinPerThread = 16384;  // elements: below this, one thread (OpenMP start-up costs more)

// Sum of (e - eh)^2 over n elements; writes g = scale (eh - e) when kGrad. Each sum runs in
// fixed vector lanes (element i of a step of kStep into a lane fixed by i, lanes added in a
// fixed order, the last n mod kStep elements after them in index order), so it does not
// depend on the thread count. Loss: float differences and sums (the gradient needs the float
// difference). Integration step: every difference and square in float64, exact for
// float32 and 16-bit inputs (a difference of two floats is exact in float64, its square
// to 2^-53), so only the additions round.
typedef double f64x4 __attribute__((vector_size(32)));  // one AVX2 register
typedef double f64x8 __attribute__((vector_size(64)));  // only converted and split, never kept: GCC spills it

constexpr int64_t kStep = 4 * kLanes;  // four vectors per step, so that the adds of the sums overlap

// Sixteen consecutive 16-bit values as two f32x8, the even and the odd elements, and back:
// 32-bit lane operations only (widening eight 16-bit lanes to 32 bits, as load8 does, is
// done by GCC in halves that are then reassembled, which doubles the loop's work).
inline __attribute__((always_inline)) u32x8 load_pairs(const void* p) {
  u32x8 w;
  std::memcpy(&w, p, sizeof w);
  return w;
}
inline __attribute__((always_inline)) void load16(const c10::BFloat16* p, f32x8& even, f32x8& odd) {
  const u32x8 w = load_pairs(p);
  even = bits_to_float(w << 16);
  odd = bits_to_float(w & 0xFFFF0000u);
}
inline __attribute__((always_inline)) void load16(const c10::Half* p, f32x8& even, f32x8& odd) {
  const u32x8 w = load_pairs(p);
  even = half_bits_to_float(w & 0xFFFFu);
  odd = half_bits_to_float(w >> 16);
}
inline __attribute__((always_inline)) void store16(c10::BFloat16* p, f32x8 even, f32x8 odd) {
  const u32x8 w = float_to_bf16_bits(even) | (float_to_bf16_bits(odd) << 16);
  std::memcpy(p, &w, sizeof w);
}
inline __attribute__((always_inline)) void store16(c10::Half* p, f32x8 even, f32x8 odd) {
  const u32x8 w = float_to_half_bits(even) | (float_to_half_bits(odd) << 16);
  std::memcpy(p, &w, sizeof w);
}

template <bool kGrad, typename scalar_t>
FB_CPU_CLONES float squared_error(const scalar_t* __restrict eh, const scalar_t* __restrict e,
                                  scalar_t* __restrict g, int64_t n, float scale) {
  f32x8 s0{}, s1{}, s2{}, s3{};  // named, not an array: GCC keeps an array of vectors on the stack
  int64_t i = 0;
  if constexpr (sizeof(scalar_t) == 2) {
    auto pair = [&](int64_t i, f32x8& even_sum, f32x8& odd_sum) __attribute__((always_inline)) {
      f32x8 e0, e1, h0, h1;
      load16(e + i, e0, e1);
      load16(eh + i, h0, h1);
      const f32x8 d0 = e0 - h0, d1 = e1 - h1;
      even_sum += d0 * d0;
      odd_sum += d1 * d1;
      if constexpr (kGrad) store16(g + i, -scale * d0, -scale * d1);
    };
    for (; i + kStep <= n; i += kStep) {
      pair(i, s0, s1);
      pair(i + 2 * kLanes, s2, s3);
    }
  } else {
    auto lane = [&](int64_t i, f32x8& sum) __attribute__((always_inline)) {
      const f32x8 diff = load8(e + i) - load8(eh + i);
      sum += diff * diff;
      if constexpr (kGrad) store8(g + i, -scale * diff);
    };
    for (; i + kStep <= n; i += kStep) {
      lane(i, s0);
      lane(i + kLanes, s1);
      lane(i + 2 * kLanes, s2);
      lane(i + 3 * kLanes, s3);
    }
  }
  float sum = lane_sum((s0 + s1) + (s2 + s3));
  for (; i < n; ++i) {
    const float diff = to_acc(e[i]) - to_acc(eh[i]);
    sum += diff * diff;
    if constexpr (kGrad) g[i] = from_acc<scalar_t>(-scale * diff);
  }
  return sum;
}

template <typename scalar_t>
FB_CPU_CLONES double squared_error_f64(const scalar_t* __restrict eh, const scalar_t* __restrict e, int64_t n) {
  f64x4 s0{}, s1{}, s2{}, s3{};
  // Eight differences widened as one f64x8 (GCC converts it with two 4-lane instructions; a
  // 4-float vector widened on its own is converted in halves and reassembled) and split.
  auto add = [&](f32x8 a, f32x8 b, f64x4& low, f64x4& high) __attribute__((always_inline)) {
    const f64x8 diff = __builtin_convertvector(a, f64x8) - __builtin_convertvector(b, f64x8);
    const f64x4 d0 = __builtin_shufflevector(diff, diff, 0, 1, 2, 3);
    const f64x4 d1 = __builtin_shufflevector(diff, diff, 4, 5, 6, 7);
    low += d0 * d0;
    high += d1 * d1;
  };
  int64_t i = 0;
  for (; i + 2 * kLanes <= n; i += 2 * kLanes) {
    if constexpr (sizeof(scalar_t) == 2) {
      f32x8 e0, e1, h0, h1;
      load16(e + i, e0, e1);
      load16(eh + i, h0, h1);
      add(e0, h0, s0, s1);
      add(e1, h1, s2, s3);
    } else {
      add(load8(e + i), load8(eh + i), s0, s1);
      add(load8(e + i + kLanes), load8(eh + i + kLanes), s2, s3);
    }
  }
  const f64x4 t = (s0 + s2) + (s1 + s3);
  double sum = (t[0] + t[2]) + (t[1] + t[3]);
  for (; i < n; ++i) {
    const double diff = static_cast<double>(to_acc(e[i])) - static_cast<double>(to_acc(eh[i]));
    sum += diff * diff;
  }
  return sum;
}

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && defined(__linux__)
#define FB_V4_LOOP 1
// squared_error_f64 on AVX-512 registers: GCC lowers the f32x8 -> f64x8 conversion of the
// loop above in 4-lane halves that it then reassembles (and splits again for the f64x4
// sums), several times the work of the one vcvtps2pd zmm each eight differences need, so
// the float64 sum cost twice the loss's float32 pass. The lanes are those of the loop
// above: `low` holds its (s0, s1) and `high` its (s2, s3), each added with one FMA as
// there, and the final reduction is the same (s0 + s2) + (s1 + s3), so both loops return
// the same bits.
#define FB_V4 __attribute__((target("arch=x86-64-v4"), always_inline)) inline
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"  // GCC 12: _mm512_cvtps_pd's unused _mm512_undefined_pd
FB_V4 __m512d widen(f32x8 x) { return _mm512_cvtps_pd((__m256)x); }
FB_V4 void add_squares(f32x8 a, f32x8 b, __m512d& sum) {
  const __m512d diff = _mm512_sub_pd(widen(a), widen(b));
  sum = _mm512_fmadd_pd(diff, diff, sum);
}

template <typename scalar_t>
__attribute__((target("arch=x86-64-v4"))) double squared_error_f64_v4(const scalar_t* __restrict eh,
                                                                      const scalar_t* __restrict e, int64_t n) {
  __m512d low = _mm512_setzero_pd(), high = _mm512_setzero_pd();
  int64_t i = 0;
  for (; i + 2 * kLanes <= n; i += 2 * kLanes) {
    if constexpr (sizeof(scalar_t) == 2) {
      f32x8 e0, e1, h0, h1;
      load16(e + i, e0, e1);
      load16(eh + i, h0, h1);
      add_squares(e0, h0, low);
      add_squares(e1, h1, high);
    } else {
      add_squares(load8(e + i), load8(eh + i), low);
      add_squares(load8(e + i + kLanes), load8(eh + i + kLanes), high);
    }
  }
  const f64x8 both = (f64x8)_mm512_add_pd(low, high);  // (s0 + s2, s1 + s3)
  const f64x4 t = __builtin_shufflevector(both, both, 0, 1, 2, 3) + __builtin_shufflevector(both, both, 4, 5, 6, 7);
  double sum = (t[0] + t[2]) + (t[1] + t[3]);
  for (; i < n; ++i) {
    const double diff = static_cast<double>(to_acc(e[i])) - static_cast<double>(to_acc(eh[i]));
    sum += diff * diff;
  }
  return sum;
}
#pragma GCC diagnostic pop

// squared_error (the loss) on sixteen-lane AVX-512 registers, for float32 and bfloat16: half
// the instructions of the eight-lane loop above, which the bfloat16 gradient's rounding made
// compute-bound (2.7x the pass without gradient on one core). Same lanes, so the same bits:
// float32 reads its four f32x8 sums s0..s3 as the halves of two f32x16, bfloat16 its even sums
// (s0, s2) and odd sums (s1, s3) as two f32x16 of 32 elements' even and odd halves, and both
// reduce as (s0 + s1) + (s2 + s3); the gradient and its rounding are elementwise.
typedef float f32x16 __attribute__((vector_size(64)));
typedef uint32_t u32x16 __attribute__((vector_size(64)));

FB_V4 f32x8 low_half(f32x16 v) { return __builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7); }
FB_V4 f32x8 high_half(f32x16 v) { return __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15); }
FB_V4 u32x16 load_words16(const void* p) {
  u32x16 w;
  std::memcpy(&w, p, sizeof w);
  return w;
}

template <bool kGrad, typename scalar_t>
__attribute__((target("arch=x86-64-v4"))) float squared_error_v4(const scalar_t* __restrict eh,
                                                                const scalar_t* __restrict e,
                                                                scalar_t* __restrict g, int64_t n, float scale) {
  static_assert(std::is_same_v<scalar_t, float> || std::is_same_v<scalar_t, c10::BFloat16>);
  f32x16 a{}, b{};
  int64_t i = 0;
  for (; i + kStep <= n; i += kStep) {
    if constexpr (std::is_same_v<scalar_t, float>) {
      f32x16 e0, e1, h0, h1;
      std::memcpy(&e0, e + i, sizeof e0);
      std::memcpy(&e1, e + i + 16, sizeof e1);
      std::memcpy(&h0, eh + i, sizeof h0);
      std::memcpy(&h1, eh + i + 16, sizeof h1);
      const f32x16 d0 = e0 - h0, d1 = e1 - h1;
      a += d0 * d0;  // (s0, s1)
      b += d1 * d1;  // (s2, s3)
      if constexpr (kGrad) {
        const f32x16 g0 = -scale * d0, g1 = -scale * d1;
        std::memcpy(g + i, &g0, sizeof g0);
        std::memcpy(g + i + 16, &g1, sizeof g1);
      }
    } else {
      const u32x16 we = load_words16(e + i), wh = load_words16(eh + i);
      const f32x16 d_even = (f32x16)(we << 16) - (f32x16)(wh << 16);
      const f32x16 d_odd = (f32x16)(we & 0xFFFF0000u) - (f32x16)(wh & 0xFFFF0000u);
      a += d_even * d_even;  // (s0, s2)
      b += d_odd * d_odd;    // (s1, s3)
      if constexpr (kGrad) {
        const u32x16 w = float_to_bf16_bits(-scale * d_even) | (float_to_bf16_bits(-scale * d_odd) << 16);
        std::memcpy(g + i, &w, sizeof w);
      }
    }
  }
  const f32x8 sums = std::is_same_v<scalar_t, float> ? (low_half(a) + high_half(a)) + (low_half(b) + high_half(b))
                                                     : low_half(a + b) + high_half(a + b);
  float sum = lane_sum(sums);
  for (; i < n; ++i) {
    const float diff = to_acc(e[i]) - to_acc(eh[i]);
    sum += diff * diff;
    if constexpr (kGrad) g[i] = from_acc<scalar_t>(-scale * diff);
  }
  return sum;
}
#undef FB_V4

#endif

// The float64 sum of (e - eh)^2: on AVX-512 registers where the CPU has them.
template <typename scalar_t>
inline double squared_error_wide(const scalar_t* eh, const scalar_t* e, int64_t n) {
#ifdef FB_V4_LOOP
  if (wide_lanes()) return squared_error_f64_v4(eh, e, n);  // as the row loops: FASTBOUND_CPU_ISA
#endif
  return squared_error_f64(eh, e, n);
}

// The loss's sum of (e - eh)^2 (and gradient): on AVX-512 registers for float32 and bfloat16.
template <bool kGrad, typename scalar_t>
inline float squared_error_any(const scalar_t* eh, const scalar_t* e, scalar_t* g, int64_t n, float scale) {
#ifdef FB_V4_LOOP
  if constexpr (std::is_same_v<scalar_t, float> || std::is_same_v<scalar_t, c10::BFloat16>) {
    if (wide_lanes()) return squared_error_v4<kGrad>(eh, e, g, n, scale);
  }
#endif
  return squared_error<kGrad>(eh, e, g, n, scale);
}

// float64 input (loss and integration step): kLanes scalar partial sums, same order rule.
template <bool kGrad>
double squared_error_double(const double* __restrict eh, const double* __restrict e, double* __restrict g,
                            int64_t n, double scale) {
  double lanes[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    for (int64_t k = 0; k < kLanes; ++k) {
      const double diff = e[i + k] - eh[i + k];
      lanes[k] += diff * diff;
      if constexpr (kGrad) g[i + k] = -scale * diff;
    }
  }
  double sum = 0;
  for (int64_t k = 0; k < kLanes; ++k) sum += lanes[k];
  for (; i < n; ++i) {
    const double diff = e[i] - eh[i];
    sum += diff * diff;
    if constexpr (kGrad) g[i] = -scale * diff;
  }
  return sum;
}

// The chunk's sum: in float64 for the integration step (kWide), else in the compute type.
template <bool kWide, typename scalar_t, typename acc_t>
inline double tile_sum(const scalar_t* eh, const scalar_t* e, scalar_t* g, int64_t n, acc_t scale) {
  if constexpr (std::is_same_v<scalar_t, double>) {
    return g != nullptr ? squared_error_double<true>(eh, e, g, n, scale)
                        : squared_error_double<false>(eh, e, nullptr, n, scale);
  } else if constexpr (kWide) {
    return squared_error_wide(eh, e, n);
  } else {
    return static_cast<double>(g != nullptr ? squared_error_any<true>(eh, e, g, n, scale)
                                            : squared_error_any<false>(eh, e, g, n, scale));
  }
}

// eps of elements first .. first + n - 1, rounded to scalar_t as perturb returns it
// (through a float tile for 16-bit types: the conversion inline would keep the loop scalar).
template <typename acc_t>
FB_CPU_CLONES void eps_tile_lanes(const uint32_t* w0, const uint32_t* w1, int64_t n, acc_t* out) {
  continuous_lanes::eps_lanes<continuous_lanes::kWidth>(w0, w1, n, out);
}
template <typename acc_t>
FB_CPU_WIDE void eps_tile_wide(const uint32_t* w0, const uint32_t* w1, int64_t n, acc_t* out) {
  continuous_lanes::eps_lanes<continuous_lanes::kWideWidth>(w0, w1, n, out);
}
template <typename acc_t>
void eps_tile(const uint32_t* w0, const uint32_t* w1, int64_t n, acc_t* out) {
  if (wide_lanes()) {
    eps_tile_wide(w0, w1, n, out);
  } else {
    eps_tile_lanes(w0, w1, n, out);
  }
}

template <typename scalar_t>
FB_CPU_CLONES void round_to(const float* in, scalar_t* out, int64_t n) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) out[j] = from_acc<scalar_t>(in[j]);
}

template <typename scalar_t>
void regenerate(uint64_t seed, uint64_t offset, uint64_t first, int64_t n, scalar_t* out) {
  using acc_t = at::opmath_type<scalar_t>;
  uint32_t w0[kTile], w1[kTile];
  continuous_tile_words(seed, offset, first, n, w0, w1, nullptr);
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    eps_tile(w0, w1, n, out);
  } else {
    acc_t wide[kTile];
    eps_tile(w0, w1, n, wide);
    round_to(wide, out, n);
  }
}

struct Regen {
  uint64_t seed, offset;
};

// Per-sample float64 sums of (eps - eps_hat)^2, chunks summed in float64 (kWide) or the
// compute type; writes the gradient when grad is not null.
template <bool kWide, typename scalar_t>
std::vector<double> row_sums(const at::Tensor& eps_hat, const std::optional<at::Tensor>& eps, const Regen& regen,
                             const at::opmath_type<scalar_t>* scale, scalar_t* grad) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t rows = eps_hat.size(0), cols = eps_hat.size(1);
  const int64_t n_chunks = (cols + kChunk - 1) / kChunk;
  std::vector<double> partial(static_cast<size_t>(rows * n_chunks), 0.0);
  const scalar_t* eh = eps_hat.const_data_ptr<scalar_t>();
  const scalar_t* e = eps.has_value() ? eps->const_data_ptr<scalar_t>() : nullptr;
  const int64_t grain = std::max<int64_t>(1, kMinPerThread / std::max<int64_t>(1, std::min(cols, kChunk)));
  at::parallel_for(0, rows * n_chunks, grain, [&](int64_t begin, int64_t end) {
    scalar_t buffer[kTile];
    for (int64_t task = begin; task < end; ++task) {
      const int64_t row = task / n_chunks, lo = (task % n_chunks) * kChunk;
      const int64_t hi = std::min(cols, lo + kChunk), first = row * cols;
      const acc_t s = scale != nullptr ? scale[row] : acc_t(0);
      double sum = 0;
      for (int64_t col = lo; col < hi; col += kTile) {
        const int64_t n = std::min(kTile, hi - col), at = first + col;
        const scalar_t* target = e != nullptr ? e + at : buffer;
        if (e == nullptr) regenerate(regen.seed, regen.offset, static_cast<uint64_t>(at), n, buffer);
        sum += tile_sum<kWide>(eh + at, target, grad != nullptr ? grad + at : nullptr, n, s);
      }
      partial[task] = sum;
    }
  });
  std::vector<double> total(static_cast<size_t>(rows), 0.0);
  for (int64_t row = 0; row < rows; ++row) {
    for (int64_t c = 0; c < n_chunks; ++c) total[row] += partial[row * n_chunks + c];
  }
  return total;
}

std::tuple<at::Tensor, at::Tensor> continuous_denoising_loss(const at::Tensor& eps_hat,
                                                             const std::optional<at::Tensor>& eps,
                                                             const at::Tensor& scale, int64_t seed, int64_t offset,
                                                             bool need_grad) {
  continuous::check_eps("continuous_denoising_loss", eps_hat, eps);
  continuous::check_per_row("continuous_denoising_loss", eps_hat, scale, continuous::compute_type(eps_hat), "scale");
  at::Tensor loss = at::empty({eps_hat.size(0)}, scale.options());
  // Written whole: a reused buffer (buffer_pool.h).
  at::Tensor grad = need_grad ? pooled_empty(eps_hat.sizes(), eps_hat.options()) : at::empty({0}, eps_hat.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, eps_hat.scalar_type(), "continuous_loss_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const acc_t* s = scale.const_data_ptr<acc_t>();
    const std::vector<double> sums = row_sums<false, scalar_t>(eps_hat, eps, Regen{static_cast<uint64_t>(seed),
                                                        static_cast<uint64_t>(offset)}, s,
                                                        need_grad ? grad.mutable_data_ptr<scalar_t>() : nullptr);
    acc_t* out = loss.mutable_data_ptr<acc_t>();
    for (size_t row = 0; row < sums.size(); ++row) out[row] = acc_t(0.5) * s[row] * static_cast<acc_t>(sums[row]);
  });
  return {loss, grad};
}

void continuous_integrate_step(const at::Tensor& eps_hat, const std::optional<at::Tensor>& eps, at::Tensor& acc,
                               const at::Tensor& weight, const std::optional<at::Tensor>& baseline,
                               const std::optional<at::Tensor>& index, int64_t seed, int64_t offset) {
  continuous::check_integrate(eps_hat, eps, acc, weight, baseline, index);
  std::vector<double> sums;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, eps_hat.scalar_type(), "continuous_integrate_cpu", [&] {
    sums = row_sums<true, scalar_t>(eps_hat, eps, Regen{static_cast<uint64_t>(seed), static_cast<uint64_t>(offset)},
                              nullptr, nullptr);
  });
  const double* w = weight.const_data_ptr<double>();
  const double* c = baseline.has_value() ? baseline->const_data_ptr<double>() : nullptr;
  const int64_t* idx = index.has_value() ? index->const_data_ptr<int64_t>() : nullptr;
  double* a = acc.mutable_data_ptr<double>();
  const int64_t n_slots = acc.size(0);
  for (size_t row = 0; row < sums.size(); ++row) {  // serial: samples may share a slot
    const int64_t slot = idx != nullptr ? idx[row] : static_cast<int64_t>(row);
    TORCH_CHECK_VALUE(slot >= 0 && slot < n_slots, "fastbound: index contains id ", slot, " outside [0, ", n_slots,
                      ")");
    const double value = w[row] * (sums[row] - (c != nullptr ? c[row] : 0.0));
    a[2 * slot] += value;
    a[2 * slot + 1] += value * value;
  }
}

}  // namespace

TORCH_LIBRARY_IMPL(fastbound, CPU, m) {
  m.impl("continuous_denoising_loss", &continuous_denoising_loss);
  m.impl("continuous_integrate_step", &continuous_integrate_step);
}

}  // namespace cpu
}  // namespace fastbound
