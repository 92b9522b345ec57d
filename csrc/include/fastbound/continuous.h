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
// backend (integer arithmetic and exact conversions). The floats built from them go
// through log, sqrt, sin and cos, whose last bits differ between libm, CUDA's
// libdevice and Triton (each within 2 ulp in float32), and a*b + c may be fused into
// one FMA; eps, u and z therefore agree to a few ulp of max(1, |value|), and a
// bfloat16 / float16 output to one unit of its last place.
#pragma once

#include <cmath>
#include <cstdint>

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

FB_HD philox::Words element_words(uint64_t seed, uint64_t offset, uint64_t index) {
  return philox::element_words(seed ^ kKeySalt, offset, index);
}

// Constants rounded once to the compute type.
template <typename T>
struct Consts;
template <>
struct Consts<float> {
  static constexpr float kTwoPi = 6.28318530717958647692f;
  static constexpr float kInvSqrt2 = 0.70710678118654752440f;
  static constexpr float kSqrt3OverPi = 0.55132889542179204315f;
  static constexpr float kSqrt3 = 1.73205080756887729353f;
};
template <>
struct Consts<double> {
  static constexpr double kTwoPi = 6.28318530717958647692;
  static constexpr double kInvSqrt2 = 0.70710678118654752440;
  static constexpr double kSqrt3OverPi = 0.55132889542179204315;
  static constexpr double kSqrt3 = 1.73205080756887729353;
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

FB_HD float log_(float x) { return logf(x); }
FB_HD double log_(double x) { return log(x); }
FB_HD float sqrt_(float x) { return sqrtf(x); }
FB_HD double sqrt_(double x) { return sqrt(x); }
FB_HD void sincos_(float x, float* s, float* c) {
#if defined(__CUDA_ARCH__)
  sincosf(x, s, c);
#else
  *s = sinf(x);
  *c = cosf(x);
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
FB_HD T eps_only(const philox::Words& w) {
  T s, c;
  sincos_(angle<T>(w.w1), &s, &c);
  return radius<T>(w.w0) * c;
}

// The non-Gaussian warm-up laws by inverse CDF of p = open_uniform(w2).
template <typename T>
FB_HD T inverse_cdf(int law, uint32_t w2) {
  const T p = open_uniform<T>(w2);
  if (law == kWarmLaplace) {
    const T t = p - T(0.5);
    const T magnitude = log_(T(1) - T(2) * (t < T(0) ? -t : t)) * -Consts<T>::kInvSqrt2;
    return t < T(0) ? -magnitude : magnitude;
  }
  if (law == kWarmLogistic) return (log_(p) - log_(T(1) - p)) * Consts<T>::kSqrt3OverPi;
  return (T(2) * p - T(1)) * Consts<T>::kSqrt3;
}

// (eps, u) of one element's words for a warm law code (u = 0 for kWarmNone).
template <typename T>
struct Noise {
  T eps, warm;
};

template <typename T>
FB_HD Noise<T> noise(const philox::Words& w, int law) {
  T s, c;
  sincos_(angle<T>(w.w1), &s, &c);
  const T r = radius<T>(w.w0);
  if (law == kWarmNone) return {r * c, T(0)};
  if (law == kWarmGaussian) return {r * c, r * s};
  return {r * c, inverse_cdf<T>(law, w.w2)};
}

}  // namespace continuous
}  // namespace fastbound
