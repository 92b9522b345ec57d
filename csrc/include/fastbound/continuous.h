// The noise contract and element math of fastbound.continuous, shared by the
// C++ CPU kernels and the CUDA kernels (header-only, torch-free, host+device).
// The Triton kernels (fastbound/triton_kernels/continuous_*.py) and the oracle
// (fastbound/continuous/reference.py) implement the same rules.
//
// THE CONTINUOUS NOISE CONTRACT
//
//   words    element i (flat row-major index over x) of a call with (seed, offset)
//            reads Philox4x32-10 (philox.h) of counter (lo, hi, 0, 0) of
//            (offset + i) mod 2^64 under the key (lo, hi) of  seed XOR kKeySalt.
//            The discrete sampler uses the key of seed itself, so for one seed the
//            two never share words (a discrete call with seed s ^ kKeySalt would).
//            A call over N elements consumes the counters offset .. offset + N - 1.
//   uniforms (exact in float32: at most 24 significant bits)
//            u1 = (2 (w0 >> 9) + 1) 2^-24 in (0, 1), p = the same of w2  (open_uniform)
//            u2 = (w1 >> 8) 2^-24 in [0, 1)                               (philox::uniform_f32)
//   eps      Box-Muller: r = sqrt(-2 ln u1), theta = u2 * 2pi (rounded once),
//            eps = r cos(theta); the Gaussian warm-up noise is r sin(theta).
//   warm u   laplace:  t = p - 1/2, u = -sign(t) ln(1 - 2|t|) / sqrt 2   (inverse CDF)
//            logistic: u = (ln p - ln(1 - p)) sqrt 3 / pi                 (inverse CDF)
//            uniform:  u = (2p - 1) sqrt 3                                 (inverse CDF)
//            every law has mean 0 and variance 1; w3 is unused.
//   z        x_warm = x + warm_std u (x when there is no warm law), z = alpha x_warm + sigma eps,
//            in float32 (float64 for float64 x), then rounded to x's dtype.
//
// Agreement between backends: the words and u1, u2, p are bit-identical on every
// backend (integer arithmetic and exact conversions), and so is the uniform law's u
// (one rounding of exact operands). The other floats go through log, sqrt, sin and
// cos: the CPU's float polynomials below, CUDA's libdevice, Triton's (numpy's in the
// interpreter), torch's in the oracle, each within about 2 ulp in float32; a*b + c
// may be fused into one FMA; and r = sqrt(-2 ln u1) scales the rounding of theta.
// eps, u and z therefore agree to a few ulp of max(1, r) (tested: 8 ulp against the
// same formulas in float64), and a bfloat16 / float16 output to one unit of its last
// place. sqrt is IEEE everywhere (Triton: sqrt_rn).
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#include "fastbound/philox.h"

namespace fastbound {
namespace continuous {

constexpr uint64_t kKeySalt = 0x6662636F6E74696Eull;  // ASCII "fbcontin"

// Warm-up law codes shared with fastbound/continuous/reference.py (WARM_CODES).
constexpr int kWarmNone = 0;
constexpr int kWarmGaussian = 1;
constexpr int kWarmLaplace = 2;
constexpr int kWarmLogistic = 3;
constexpr int kWarmUniform = 4;

template <int kLaw>
struct LawTag {
  static constexpr int value = kLaw;
};

FB_HD philox::Words element_words(uint64_t seed, uint64_t offset, uint64_t index) {
  return philox::element_words(seed ^ kKeySalt, offset, index);
}

// Constants: the double nearest the real value, rounded to the compute type (as the
// oracle forms them: a Python float converted to the tensor's dtype).
template <typename T>
struct Consts {
  static constexpr T kTwoPi = static_cast<T>(6.28318530717958647692);
  static constexpr T kInvSqrt2 = static_cast<T>(0.70710678118654752440);
  static constexpr T kSqrt3OverPi = static_cast<T>(0.55132889542179204315);
  static constexpr T kSqrt3 = static_cast<T>(1.73205080756887729353);
};

// log and sincos. CUDA: logf / sincosf (and the double functions). Host float:
// Cephes-style polynomials written without branches or library calls, within
// about 2 ulp (checked against float64 by tests/test_continuous_kernels.py);
// host double: libm. The polynomials are templates over a lane type `L`: one
// float (`FloatLane` below) or a GCC vector of floats (the CPU kernels,
// csrc/cpu/continuous_lanes.h), the same operations in the same order in every
// lane. `L` supplies the float and int32 lane types F and I, the truncating
// F -> I and exact I -> F conversions, and the reinterpretation of the bits.
struct FloatLane {
  using F = float;
  using I = int32_t;
  static FB_HD I to_int(F x) { return static_cast<I>(x); }
  static FB_HD F to_float(I i) { return static_cast<F>(i); }
  static FB_HD I bits(F x) { return bit_cast<I>(x); }
  static FB_HD F from_bits(I i) { return bit_cast<F>(i); }
};

// log x for a positive normal float (every argument here lies in [2^-24, 1]):
// x = m 2^e with m in [sqrt(1/2), sqrt 2), log x = log1p(m - 1) + e log 2, the
// log1p by Cephes `logf`'s degree-9 polynomial, log 2 split in two parts.
template <typename L>
FB_HD typename L::F log_lanes(typename L::F x) {
  using F = typename L::F;
  using I = typename L::I;
  const I bits = L::bits(x), mantissa = bits & 0x007FFFFF;
  const F m0 = L::from_bits(mantissa | 0x3F000000);  // x = m0 2^e, m0 in [1/2, 1)
  // All ones where m0 < sqrt(1/2) (0x3F3504F3 is that float), else zero: a mask from
  // integer arithmetic, since GCC splits vector compares wider than the target's into lanes.
  const I low = (mantissa - 0x003504F3) >> 31;
  const I e = (bits >> 23) - 126 + low;  // x > 0: the sign bit is clear
  const F m = m0 + L::from_bits(L::bits(m0) & low) - 1.0f;  // 2 m0 - 1 or m0 - 1
  const F z = m * m;
  F y = m * 7.0376836292e-2f - 1.1514610310e-1f;
  y = y * m + 1.1676998740e-1f;
  y = y * m - 1.2420140846e-1f;
  y = y * m + 1.4249322787e-1f;
  y = y * m - 1.6668057665e-1f;
  y = y * m + 2.0000714765e-1f;
  y = y * m - 2.4999993993e-1f;
  y = y * m + 3.3333331174e-1f;
  y = y * m * z;
  const F fe = L::to_float(e);
  y += fe * -2.12194440e-4f;
  y += z * -0.5f;
  return (m + y) + fe * 0.693359375f;
}

// sin and cos of x in [0, 2^13): Cody-Waite reduction by pi/4 in three parts to
// r in [-pi/4, pi/4] and the octant j, Cephes `sinf` / `cosf` polynomials on r,
// then the octant's swap and signs.
template <typename L>
FB_HD void sincos_lanes(typename L::F x, typename L::F* s, typename L::F* c) {
  using F = typename L::F;
  using I = typename L::I;
  I j = L::to_int(x * 1.27323954473516268615f);  // 4 / pi
  j = (j + 1) & ~1;
  const F y = L::to_float(j);
  const F r = ((x - y * 0.78515625f) - y * 2.4187564849853515625e-4f) - y * 3.77489497744594108e-8f;
  const F z = r * r;
  const F sr = ((z * -1.9515295891e-4f + 8.3321608736e-3f) * z - 1.6666654611e-1f) * z * r + r;
  const F cr = ((z * 2.443315711809948e-5f - 1.388731625493765e-3f) * z + 4.166664568298827e-2f) * z * z -
               z * 0.5f + 1.0f;
  // Octant swap and signs in integer bit operations (no branch GCC could fail to if-convert):
  // swap sin and cos when bit 1 of j is set; negate sin by bit 2 of j, cos by bit 2 of j + 2,
  // which for an even j is bit 2 of j xor bit 1 (one shift less: on Zen 1 vector shifts issue
  // on a single pipe). `(j & 4) << 29` reaches the sign bit: well defined from C++20, the
  // standard of the CPU build (torch's extension flags); the CUDA kernels call sincosf instead.
  const I swap = 0 - ((j >> 1) & 1);  // all ones where bit 1 is set
  const I sign_s = (j & 4) << 29, sign_c = sign_s ^ (swap & INT32_MIN);
  const I sb = L::bits(sr), cb = L::bits(cr);
  const I sv = (cb & swap) | (sb & ~swap), cv = (sb & swap) | (cb & ~swap);
  *s = L::from_bits(sv ^ sign_s);
  *c = L::from_bits(cv ^ sign_c);
}

FB_HD float log_f32(float x) { return log_lanes<FloatLane>(x); }
FB_HD void sincos_f32(float x, float* s, float* c) { sincos_lanes<FloatLane>(x, s, c); }

FB_HD float log_(float x) {
#if defined(__CUDA_ARCH__)
  return logf(x);
#else
  return log_f32(x);
#endif
}
FB_HD double log_(double x) { return log(x); }
FB_HD float fabs_(float x) { return fabsf(x); }
FB_HD double fabs_(double x) { return fabs(x); }
FB_HD float copysign_(float x, float y) { return copysignf(x, y); }
FB_HD double copysign_(double x, double y) { return copysign(x, y); }
FB_HD float sqrt_(float x) { return sqrtf(x); }
FB_HD double sqrt_(double x) { return sqrt(x); }
FB_HD void sincos_(float x, float* s, float* c) {
#if defined(__CUDA_ARCH__)
  sincosf(x, s, c);
#else
  sincos_f32(x, s, c);
#endif
}
FB_HD void sincos_(double x, double* s, double* c) {
#if defined(__CUDA_ARCH__)
  sincos(x, s, c);
#else
  *s = ::sin(x);
  *c = ::cos(x);
#endif
}

// The noise formulas below are templates over the math `M` they run on: one
// element in T = float or double (`ElementMath<T>`, every backend's kernels) or
// a vector of floats (the CPU kernels, csrc/cpu/continuous_lanes.h). `M` supplies
// the element type E, the lane types F (of E) and U (of uint32), the exact
// conversion of a U below 2^24 to F, and log, sqrt, sincos, abs and copysign.
template <typename T>
struct ElementMath {
  using E = T;
  using F = T;
  using U = uint32_t;
  static FB_HD F u24(U u) { return static_cast<T>(u); }
  static FB_HD F log(F x) { return log_(x); }
  static FB_HD F sqrt(F x) { return sqrt_(x); }
  static FB_HD void sincos(F x, F* s, F* c) { sincos_(x, s, c); }
  static FB_HD F abs(F x) { return fabs_(x); }
  static FB_HD F copysign(F x, F y) { return copysign_(x, y); }
};

// (2 (w >> 9) + 1) 2^-24: an odd multiple of 2^-24, never 0 or 1, and 1 - u is exact.
template <typename M>
FB_HD typename M::F open_uniform(typename M::U w) {
  return M::u24((w >> 8) | 1u) * typename M::E(5.9604644775390625e-8);  // (w >> 8) | 1 = 2 (w >> 9) + 1
}

template <typename M>
FB_HD typename M::F half_open_uniform(typename M::U w) {
  return M::u24(w >> 8) * typename M::E(5.9604644775390625e-8);
}

// Box-Muller radius and angle of words (w0, w1).
template <typename M>
FB_HD typename M::F radius(typename M::U w0) {
  return M::sqrt(M::log(open_uniform<M>(w0)) * typename M::E(-2));
}
template <typename M>
FB_HD typename M::F angle(typename M::U w1) {
  return half_open_uniform<M>(w1) * Consts<typename M::E>::kTwoPi;
}

// eps alone (the loss and integration kernels regenerate only it).
template <typename M>
FB_HD typename M::F eps_of(typename M::U w0, typename M::U w1) {
  typename M::F s, c;
  M::sincos(angle<M>(w1), &s, &c);
  return radius<M>(w0) * c;
}
template <typename T>
FB_HD T eps_only(uint32_t w0, uint32_t w1) {
  return eps_of<ElementMath<T>>(w0, w1);
}

// The non-Gaussian warm-up laws by inverse CDF of p = open_uniform(w2).
template <typename M, int kLaw>
FB_HD typename M::F inverse_cdf(typename M::U w2) {
  using E = typename M::E;
  const typename M::F p = open_uniform<M>(w2);
  if (kLaw == kWarmLaplace) {
    const typename M::F t = p - E(0.5);
    return M::copysign(M::log(E(1) - M::abs(t) * E(2)) * -Consts<E>::kInvSqrt2, t);  // t is never 0
  }
  if (kLaw == kWarmLogistic) return (M::log(p) - M::log(E(1) - p)) * Consts<E>::kSqrt3OverPi;
  return (p * E(2) - E(1)) * Consts<E>::kSqrt3;
}

// (eps, u) of one element's words for a warm law (u = 0 for kWarmNone).
template <typename T>
struct Noise {
  T eps, warm;
};

// Box-Muller pair of words (w0, w1): eps = r cos(theta) and the Gaussian warm noise r sin(theta).
template <typename M>
FB_HD Noise<typename M::F> gaussian_pair(typename M::U w0, typename M::U w1) {
  typename M::F s, c;
  M::sincos(angle<M>(w1), &s, &c);
  const typename M::F r = radius<M>(w0);
  return {r * c, r * s};
}

template <typename M, int kLaw>
FB_HD Noise<typename M::F> noise_of(typename M::U w0, typename M::U w1, typename M::U w2) {
  const Noise<typename M::F> pair = gaussian_pair<M>(w0, w1);
  if (kLaw == kWarmNone) return {pair.eps, typename M::F{}};
  if (kLaw == kWarmGaussian) return pair;
  return {pair.eps, inverse_cdf<M, kLaw>(w2)};
}
template <typename T, int kLaw>
FB_HD Noise<T> noise(uint32_t w0, uint32_t w1, uint32_t w2) {
  return noise_of<ElementMath<T>, kLaw>(w0, w1, w2);
}

// Calls fn(LawTag<law>{}) for a runtime law code in [kWarmNone, kWarmUniform] (host code:
// the launchers and the CPU kernels pick a kernel per law).
template <typename Fn>
inline void with_law(int law, Fn&& fn) {
  switch (law) {
    case kWarmGaussian: fn(LawTag<kWarmGaussian>{}); break;
    case kWarmLaplace: fn(LawTag<kWarmLaplace>{}); break;
    case kWarmLogistic: fn(LawTag<kWarmLogistic>{}); break;
    case kWarmUniform: fn(LawTag<kWarmUniform>{}); break;
    default: fn(LawTag<kWarmNone>{}); break;
  }
}

}  // namespace continuous
}  // namespace fastbound
