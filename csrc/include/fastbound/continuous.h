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

// (2 (w >> 9) + 1) 2^-24: an odd multiple of 2^-24, never 0 or 1, and 1 - u is exact.
template <typename T>
FB_HD T open_uniform(uint32_t w) {
  return static_cast<T>((w >> 9) * 2u + 1u) * static_cast<T>(5.9604644775390625e-8);
}

template <typename T>
FB_HD T half_open_uniform(uint32_t w) {
  return static_cast<T>(w >> 8) * static_cast<T>(5.9604644775390625e-8);
}

// log and sincos. CUDA: logf / sincosf (and the double functions). Host float:
// Cephes-style polynomials written without branches or library calls, so the CPU
// kernels' loops vectorise (scalar libm calls would dominate their time); both are
// within about 2 ulp (checked against float64 by tests/test_continuous_kernels.py).
// Host double: libm.
// The bits of a value reinterpreted as another type of the same size.
template <typename To, typename From>
FB_HD To bit_cast(From from) {
  static_assert(sizeof(To) == sizeof(From), "bit_cast needs types of one size");
  To to;
  memcpy(&to, &from, sizeof to);
  return to;
}

// log x for a positive normal float (every argument here lies in [2^-24, 1]):
// x = m 2^e with m in [sqrt(1/2), sqrt 2), log x = log1p(m - 1) + e log 2, the
// log1p by Cephes `logf`'s degree-9 polynomial, log 2 split in two parts.
FB_HD float log_f32(float x) {
  const uint32_t bits = bit_cast<uint32_t>(x);
  int32_t e = static_cast<int32_t>((bits >> 23) & 0xFFu) - 126;  // x = m 2^e, m in [1/2, 1)
  float m = bit_cast<float>((bits & 0x007FFFFFu) | 0x3F000000u);
  const bool low = m < 0.707106781186547524f;
  e -= low ? 1 : 0;
  m = m + (low ? m : 0.0f) - 1.0f;  // 2m - 1 or m - 1; a select of values, not of operations, vectorises
  const float z = m * m;
  float y = 7.0376836292e-2f;
  y = y * m - 1.1514610310e-1f;
  y = y * m + 1.1676998740e-1f;
  y = y * m - 1.2420140846e-1f;
  y = y * m + 1.4249322787e-1f;
  y = y * m - 1.6668057665e-1f;
  y = y * m + 2.0000714765e-1f;
  y = y * m - 2.4999993993e-1f;
  y = y * m + 3.3333331174e-1f;
  y = y * m * z;
  const float fe = static_cast<float>(e);
  y += -2.12194440e-4f * fe;
  y += -0.5f * z;
  return (m + y) + 0.693359375f * fe;
}

// sin and cos of x in [0, 2^13): Cody-Waite reduction by pi/4 in three parts to
// r in [-pi/4, pi/4] and the octant j, Cephes `sinf` / `cosf` polynomials on r,
// then the octant's swap and signs.
FB_HD void sincos_f32(float x, float* s, float* c) {
  int32_t j = static_cast<int32_t>(x * 1.27323954473516268615f);  // 4 / pi
  j = (j + 1) & ~1;
  const float y = static_cast<float>(j);
  const float r = ((x - y * 0.78515625f) - y * 2.4187564849853515625e-4f) - y * 3.77489497744594108e-8f;
  const float z = r * r;
  const float sr = ((-1.9515295891e-4f * z + 8.3321608736e-3f) * z - 1.6666654611e-1f) * z * r + r;
  const float cr = ((2.443315711809948e-5f * z - 1.388731625493765e-3f) * z + 4.166664568298827e-2f) * z * z -
                   0.5f * z + 1.0f;
  // Octant swap and signs in integer bit operations (no branch GCC could fail to if-convert):
  // swap sin and cos when bit 1 of j is set; negate sin by bit 2 of j, cos by bit 2 of j + 2.
  const uint32_t swap = 0u - ((static_cast<uint32_t>(j) >> 1) & 1u);
  const uint32_t sb = bit_cast<uint32_t>(sr), cb = bit_cast<uint32_t>(cr);
  const uint32_t sv = (cb & swap) | (sb & ~swap), cv = (sb & swap) | (cb & ~swap);
  *s = bit_cast<float>(sv ^ (static_cast<uint32_t>(j & 4) << 29));
  *c = bit_cast<float>(cv ^ (static_cast<uint32_t>((j + 2) & 4) << 29));
}

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

// Box-Muller radius and angle of words (w0, w1).
template <typename T>
FB_HD T radius(uint32_t w0) {
  return sqrt_(T(-2) * log_(open_uniform<T>(w0)));
}
template <typename T>
FB_HD T angle(uint32_t w1) {
  return half_open_uniform<T>(w1) * Consts<T>::kTwoPi;
}

// eps alone (the loss and integration kernels regenerate only it).
template <typename T>
FB_HD T eps_only(uint32_t w0, uint32_t w1) {
  T s, c;
  sincos_(angle<T>(w1), &s, &c);
  return radius<T>(w0) * c;
}

// The non-Gaussian warm-up laws by inverse CDF of p = open_uniform(w2).
template <typename T, int kLaw>
FB_HD T inverse_cdf(uint32_t w2) {
  const T p = open_uniform<T>(w2);
  if (kLaw == kWarmLaplace) {
    const T t = p - T(0.5);
    return copysign_(log_(T(1) - T(2) * fabs_(t)) * -Consts<T>::kInvSqrt2, t);  // t is never 0
  }
  if (kLaw == kWarmLogistic) return (log_(p) - log_(T(1) - p)) * Consts<T>::kSqrt3OverPi;
  return (T(2) * p - T(1)) * Consts<T>::kSqrt3;
}

// (eps, u) of one element's words for a warm law (u = 0 for kWarmNone).
template <typename T>
struct Noise {
  T eps, warm;
};

// Box-Muller pair of words (w0, w1): eps = r cos(theta) and the Gaussian warm noise r sin(theta).
template <typename T>
FB_HD Noise<T> gaussian_pair(uint32_t w0, uint32_t w1) {
  T s, c;
  sincos_(angle<T>(w1), &s, &c);
  const T r = radius<T>(w0);
  return {r * c, r * s};
}

template <typename T, int kLaw>
FB_HD Noise<T> noise(uint32_t w0, uint32_t w1, uint32_t w2) {
  const Noise<T> pair = gaussian_pair<T>(w0, w1);
  if (kLaw == kWarmNone) return {pair.eps, T(0)};
  if (kLaw == kWarmGaussian) return pair;
  return {pair.eps, inverse_cdf<T, kLaw>(w2)};
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
