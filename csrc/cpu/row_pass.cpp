// The vectorised row loops of the CPU loss kernels (row_pass.h), compiled
// once per x86-64 level (FB_CPU_CLONES), and the ISA report (vectorize.h).
//
// Float accumulation (fp32 / bf16 / fp16 scores) runs on f32x8 lanes with the
// vector exp (fastbound::exp_lanes); blocks of 64 scores whose exponents all
// lie in the normal range (the usual case) take exp_lanes_normal, which skips
// the range fix-ups and gives the same values. The last < 16 columns take the
// scalar exp_f32 (same formula). float64 keeps the scalar loop over libm's exp.
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

constexpr int64_t kStep = 2 * kLanes;  // two vectors per step, so that the adds of the sums overlap
constexpr int64_t kBlock = 4 * kStep;  // the range check's unit

// Whether every |s - shift| of the kBlock scores at s is at most
// kExpNormalBound (no inf, no NaN): compared as the bits of |x|, which order
// like the magnitudes and put inf and NaN above every finite value.
template <typename scalar_t>
inline __attribute__((always_inline)) bool block_is_normal(const scalar_t* s, float shift) {
  u32x8 m{};
  for (int64_t k = 0; k < kBlock; k += kLanes) {
    const u32x8 a = float_to_bits(load8(s + k) - shift) & 0x7FFFFFFFu;
    m = a > m ? a : m;
  }
  const u32x8 bound = u32x8{} + float_to_bits(kExpNormalBound);
  const auto over = m > bound;
  uint32_t any = 0;
  for (int k = 0; k < kLanes; ++k) any |= static_cast<uint32_t>(over[k]);
  return any == 0;
}

template <bool kWrite, typename scalar_t, typename out_t>
inline __attribute__((always_inline)) RowSums<float> row_pass_lanes(const scalar_t* s, out_t* g, int64_t n,
                                                                    float shift, float scale, float offset) {
  f32x8 se0{}, se1{}, ss0{}, ss1{};
  // kSteps vectors of kStep scores from column i, with the full exp or (kNormal) the in-range one.
  auto steps = [&]<bool kNormal>(int64_t i, int64_t k_steps) {
    for (int64_t k = 0; k < k_steps; ++k, i += kStep) {
      const f32x8 v0 = load8(s + i), v1 = load8(s + i + kLanes);
      const f32x8 e0 = kNormal ? exp_lanes_normal<VecLanes>(v0 - shift) : exp_lanes<VecLanes>(v0 - shift);
      const f32x8 e1 = kNormal ? exp_lanes_normal<VecLanes>(v1 - shift) : exp_lanes<VecLanes>(v1 - shift);
      se0 += e0;
      se1 += e1;
      ss0 += v0;
      ss1 += v1;
      if constexpr (kWrite) {
        store8(g + i, scale * e0 + offset);
        store8(g + i + kLanes, scale * e1 + offset);
      }
    }
  };
  int64_t i = 0;
  for (; i + kBlock <= n; i += kBlock) {
    if (block_is_normal(s + i, shift)) {
      steps.template operator()<true>(i, kBlock / kStep);
    } else {
      steps.template operator()<false>(i, kBlock / kStep);
    }
  }
  const int64_t k_steps = (n - i) / kStep;
  steps.template operator()<false>(i, k_steps);
  i += k_steps * kStep;
  float sum_exp = lane_sum(se0 + se1), sum_score = lane_sum(ss0 + ss1);
  for (; i < n; ++i) {
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
