// The vectorised row loops of the CPU loss kernels (row_pass.h), compiled
// once per x86-64 level (FB_CPU_CLONES), and the ISA report (vectorize.h).
//
// Float accumulation (fp32 / bf16 / fp16 scores) runs on f32x8 lanes with the
// vector exp (fastbound::exp_lanes); blocks of 256 scores whose exponents all
// lie in the normal range (the usual case) take exp_lanes_normal, which skips
// the range fix-ups and gives the same values. The last < 8 columns take the scalar exp_f32 (same formula).
// float64 keeps the scalar loop over libm's exp.
#include "row_pass.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>

#include "convert.h"
#include "fastbound/elementwise.h"
#include "vectorize.h"

namespace fastbound {
namespace cpu {
namespace {

// The range check's unit.
constexpr int64_t kBlock = 256;

// The bits of |x| as int32: they order like the magnitudes and put inf and NaN
// above every finite value.
inline __attribute__((always_inline)) i32x8 abs_bits(f32x8 x) { return VecLanes::as_int(x) & 0x7FFFFFFF; }

// Whether no lane of m (a running maximum of abs_bits) exceeds kExpNormalBound.
inline __attribute__((always_inline)) bool all_normal(i32x8 m) {
  const i32x8 over = m > VecLanes::as_int(VecLanes::splat(kExpNormalBound));
  int32_t any = 0;
  for (int k = 0; k < kLanes; ++k) any |= over[k];
  return any == 0;
}

template <typename scalar_t>
inline __attribute__((always_inline)) bool block_is_normal(const scalar_t* s, int64_t n, float shift) {
  i32x8 m{};
  for (int64_t k = 0; k < n; k += kLanes) {
    const i32x8 a = abs_bits(load8(s + k) - shift);
    m = a > m ? a : m;
  }
  return all_normal(m);
}

template <bool kWrite, typename scalar_t, typename out_t>
inline __attribute__((always_inline)) RowSums<float> row_pass_lanes(const scalar_t* s, out_t* g, int64_t n,
                                                                    float shift, float scale, float offset) {
  // One vector per step: the exp's multiplies bound the loop, the sums' adds have slack.
  f32x8 se{}, ss{};
  // The vectors of [lo, hi) into the sums, with the full exp or (kNormal) the
  // in-range one; the largest abs_bits(s - shift) seen goes into m.
  auto steps = [&]<bool kNormal>(int64_t lo, int64_t hi, f32x8& sum_exp, f32x8& sum_score, i32x8& m) {
    for (int64_t i = lo; i < hi; i += kLanes) {
      const f32x8 v = load8(s + i);
      const f32x8 x = v - shift;
      const i32x8 a = abs_bits(x);
      m = a > m ? a : m;
      const f32x8 e = kNormal ? exp_lanes_normal<VecLanes>(x) : exp_lanes<VecLanes>(x);
      sum_exp += e;
      sum_score += v;
      if constexpr (kWrite) store8(g + i, scale * e + offset);
    }
  };
  const int64_t n_vec = n - n % kLanes;
  // In place, the gradient overwrites the scores: each block is checked first
  // (a second read from L1). Otherwise it takes the in-range exp, is checked
  // as it goes, and is computed again with the full exp when out of range
  // (rare: a score 87 away from the shift, inf or NaN).
  const bool check_first = kWrite && static_cast<const void*>(g) == static_cast<const void*>(s);
  int64_t i = 0;
  for (; i + kBlock <= n_vec; i += kBlock) {
    i32x8 m{};
    if (check_first) {
      if (block_is_normal(s + i, kBlock, shift)) {
        steps.template operator()<true>(i, i + kBlock, se, ss, m);
      } else {
        steps.template operator()<false>(i, i + kBlock, se, ss, m);
      }
      continue;
    }
    f32x8 block_se{};
    steps.template operator()<true>(i, i + kBlock, block_se, ss, m);
    if (all_normal(m)) {
      se += block_se;
    } else {
      f32x8 again{};
      steps.template operator()<false>(i, i + kBlock, se, again, m);
    }
  }
  {
    i32x8 m{};
    steps.template operator()<false>(i, n_vec, se, ss, m);
  }
  float sum_exp = lane_sum(se), sum_score = lane_sum(ss);
  for (i = n_vec; i < n; ++i) {
    const float v = to_acc(s[i]);
    const float e = exp_f32(v - shift);
    sum_exp += e;
    sum_score += v;
    if constexpr (kWrite) g[i] = from_acc<out_t>(scale * e + offset);
  }
  return {sum_exp, sum_score};
}

}  // namespace

template <typename scalar_t, typename acc_t, typename out_t>
FB_CPU_CLONES RowSums<acc_t> row_pass(const scalar_t* s, out_t* g, int64_t n, acc_t shift, acc_t scale,
                                      acc_t offset) {
  if constexpr (std::is_same_v<acc_t, float>) {
    return g == nullptr ? row_pass_lanes<false>(s, g, n, shift, scale, offset)
                        : row_pass_lanes<true>(s, g, n, shift, scale, offset);
  } else {
    acc_t sum_exp = 0, sum_score = 0;
    for (int64_t i = 0; i < n; ++i) {
      const acc_t v = to_acc(s[i]);
      const acc_t e = exp_acc(v - shift);
      sum_exp += e;
      sum_score += v;
      if (g != nullptr) g[i] = from_acc<out_t>(scale * e + offset);
    }
    return {sum_exp, sum_score};
  }
}

template <typename scalar_t, typename acc_t>
FB_CPU_CLONES acc_t row_max(const scalar_t* s, int64_t n) {
  acc_t m = -std::numeric_limits<acc_t>::infinity();
  int64_t i = 0;
  if constexpr (std::is_same_v<acc_t, float>) {
    f32x8 m0 = VecLanes::splat(m), m1 = m0;
    for (; i + 2 * kLanes <= n; i += 2 * kLanes) {
      const f32x8 v0 = load8(s + i), v1 = load8(s + i + kLanes);
      m0 = v0 > m0 ? v0 : m0;  // NaN-blind: a NaN lane never replaces the maximum
      m1 = v1 > m1 ? v1 : m1;
    }
    m = lane_max(m1, lane_max(m0, m));
  }
  for (; i < n; ++i) {
    const acc_t v = to_acc(s[i]);
    m = v > m ? v : m;
  }
  return m;
}

template <typename scalar_t, typename acc_t>
FB_CPU_CLONES void row_rescale(const acc_t* e, scalar_t* g, int64_t n, acc_t factor) {
  int64_t i = 0;
  if constexpr (std::is_same_v<acc_t, float>) {
    for (; i + kLanes <= n; i += kLanes) store8(g + i, factor * load8(e + i));
  }
  for (; i < n; ++i) g[i] = from_acc<scalar_t>(factor * e[i]);
}

#define FB_INSTANTIATE(scalar_t, acc_t)                                                                          \
  template RowSums<acc_t> row_pass<scalar_t, acc_t>(const scalar_t*, scalar_t*, int64_t, acc_t, acc_t, acc_t);   \
  template acc_t row_max<scalar_t, acc_t>(const scalar_t*, int64_t);                                             \
  template void row_rescale<scalar_t, acc_t>(const acc_t*, scalar_t*, int64_t, acc_t);
FB_INSTANTIATE(float, float)
FB_INSTANTIATE(double, double)
FB_INSTANTIATE(c10::Half, float)
FB_INSTANTIATE(c10::BFloat16, float)
#undef FB_INSTANTIATE
// The DCE's exponentials of 16-bit scores, kept in float.
template RowSums<float> row_pass<c10::Half, float, float>(const c10::Half*, float*, int64_t, float, float, float);
template RowSums<float> row_pass<c10::BFloat16, float, float>(const c10::BFloat16*, float*, int64_t, float, float,
                                                              float);

const char* isa_name() {
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && defined(__linux__)
  if (__builtin_cpu_supports("x86-64-v4")) return "avx512";
  if (__builtin_cpu_supports("x86-64-v3")) return "avx2";
#endif
  return "baseline";
}

}  // namespace cpu
}  // namespace fastbound
