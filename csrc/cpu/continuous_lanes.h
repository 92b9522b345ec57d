// The continuous noise formulas (csrc/include/fastbound/continuous.h) on GCC
// vector lanes, for the CPU kernels.
//
// GCC vectorises the scalar formulas' loop eight lanes wide, but each vector
// then runs one long dependent chain (log's Horner polynomial, sqrt, sincos)
// that the out-of-order window does not overlap with the next. `VecMath<W>`
// evaluates the same formulas, the same operations in the same order, on W
// lanes at once, which GCC lowers to W / 8 interleaved AVX2 registers (W / 4
// SSE2 ones, W / 16 AVX-512 ones). W = kWidth = 32 on every target: on one core
// of a Zen 1 EPYC, perturb's Gaussian-law transform takes 4.0-4.6 ns an element
// against 6.0 for the scalar loop (16 lanes: 4.9; 64: spills). AVX-512's 32
// registers hold W = kWideWidth = 64 (four chains), the width the kernels take
// where wide_lanes() (vectorize.h) says so: on one core of this project's Xeon
// host, perturb (256 x 3072, Gaussian law) took 0.92x the time of 32 lanes in
// float32 and 0.97x in bfloat16 (means of six alternating runs; 64 lanes spill
// some values, yet overlap more of the chains). Results are bit-identical at
// every width and to the scalar formulas' (tests/test_cpu_isa.py compares 64 and 32
// lanes; tests/test_continuous_kernels.py the vector lanes and the scalar tail).
// Vector compares wider than the target's registers are split into scalar
// lanes by GCC, so the formulas build their masks from integer arithmetic.
#pragma once

#include <cstdint>
#include <cstring>
#include <type_traits>

#include "continuous_words.h"
#include "convert.h"
#include "fastbound/continuous.h"
#include "vectorize.h"

namespace fastbound {
namespace cpu {
namespace continuous_lanes {

#define FB_LANE inline __attribute__((always_inline))

constexpr int64_t kWidth = 32;
constexpr int64_t kWideWidth = 64;

// W-lane vector types, spelled out per width (GCC drops a vector_size that depends on a
// template parameter).
template <int64_t W>
struct Vectors;
template <>
struct Vectors<kWidth> {
  typedef float F __attribute__((vector_size(4 * kWidth)));
  typedef int32_t I __attribute__((vector_size(4 * kWidth)));
  typedef uint32_t U __attribute__((vector_size(4 * kWidth)));
};
template <>
struct Vectors<kWideWidth> {
  typedef float F __attribute__((vector_size(4 * kWideWidth)));
  typedef int32_t I __attribute__((vector_size(4 * kWideWidth)));
  typedef uint32_t U __attribute__((vector_size(4 * kWideWidth)));
};

// continuous.h's lane type (log_lanes, sincos_lanes) and noise math (noise_of, eps_of) on W floats.
template <int64_t W>
struct VecMath {
  using E = float;
  using F = typename Vectors<W>::F;
  using I = typename Vectors<W>::I;
  using U = typename Vectors<W>::U;
  static FB_LANE I to_int(F x) { return __builtin_convertvector(x, I); }
  static FB_LANE F to_float(I i) { return __builtin_convertvector(i, F); }
  static FB_LANE I bits(F x) { return (I)x; }  // a vector cast reinterprets the bits
  static FB_LANE F from_bits(I i) { return (F)i; }
  static FB_LANE F u24(U u) { return to_float((I)u); }  // u < 2^24: exact through int32
  static FB_LANE F log(F x) { return continuous::log_lanes<VecMath>(x); }
  static FB_LANE F sqrt(F x) {
    F r;
    for (int k = 0; k < W; ++k) r[k] = __builtin_sqrtf(x[k]);  // one vsqrtps per register
    return r;
  }
  static FB_LANE void sincos(F x, F* s, F* c) { continuous::sincos_lanes<VecMath>(x, s, c); }
  static FB_LANE F abs(F x) { return from_bits(bits(x) & 0x7FFFFFFF); }
  static FB_LANE F copysign(F x, F y) { return from_bits((bits(x) & 0x7FFFFFFF) | (bits(y) & INT32_MIN)); }

  static FB_LANE U load_words(const uint32_t* p) {
    U v;
    std::memcpy(&v, p, sizeof v);
    return v;
  }

  // W values of any dtype as floats, and back (unaligned). Float moves as one copy and
  // bfloat16 in 16-lane parts; float16 by convert.h's eight-lane moves. Assembling the lanes
  // from 8-lane parts goes through the stack, whose 256-bit stores a 512-bit reload cannot
  // forward, and a shuffle joining two 16-lane halves is lowered lane by lane. The bfloat16
  // store takes float_to_bf16_bits's wide form: sixteen lanes exceed the registers of every
  // target but AVX-512.
  template <typename scalar_t>
  static FB_LANE F load(const scalar_t* p) {
    F v;
    if constexpr (std::is_same_v<scalar_t, float>) {
      std::memcpy(&v, p, sizeof v);
    } else if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
      for (int64_t k = 0; k < W; k += 16) {
        u16x16 h;
        std::memcpy(&h, p + k, sizeof h);
        const u32x16 part = widen(h) << 16;
        std::memcpy(reinterpret_cast<char*>(&v) + 4 * k, &part, sizeof part);
      }
    } else {
      for (int64_t k = 0; k < W; k += kLanes) {
        const f32x8 part = load8(p + k);
        std::memcpy(reinterpret_cast<char*>(&v) + 4 * k, &part, sizeof part);
      }
    }
    return v;
  }
  template <typename scalar_t>
  static FB_LANE void store(scalar_t* p, F v) {
    if constexpr (std::is_same_v<scalar_t, float>) {
      std::memcpy(p, &v, sizeof v);
    } else if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
      for (int64_t k = 0; k < W; k += 16) {
        f32x16 part;
        std::memcpy(&part, reinterpret_cast<const char*>(&v) + 4 * k, sizeof part);
        const u16x16 h = narrow(float_to_bf16_bits</*kWide=*/true>(part));
        std::memcpy(p + k, &h, sizeof h);
      }
    } else {
      for (int64_t k = 0; k < W; k += kLanes) {
        f32x8 part;
        std::memcpy(&part, reinterpret_cast<const char*>(&v) + 4 * k, sizeof part);
        store8(p + k, part);
      }
    }
  }
};

// eps of n elements from their words w0, w1 (continuous::eps_of), rounded to scalar_t:
// in float on W lanes (the last n mod W on one float, bit-identical but for where GCC
// fuses a multiply and an add), in double for a double out. Always inlined, so it takes
// the ISA of the caller (an FB_CPU_CLONES or FB_CPU_WIDE loop).
template <int64_t W, typename scalar_t>
FB_LANE void eps_lanes(const uint32_t* w0, const uint32_t* w1, int64_t n, scalar_t* out) {
  using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
  using M = VecMath<W>;
  int64_t j = 0;
  if constexpr (std::is_same_v<acc_t, float>) {
    for (; j + W <= n; j += W) M::store(out + j, continuous::eps_of<M>(M::load_words(w0 + j), M::load_words(w1 + j)));
  }
  for (; j < n; ++j) out[j] = from_acc<scalar_t>(continuous::eps_only<acc_t>(w0[j], w1[j]));
}

#undef FB_LANE

}  // namespace continuous_lanes
}  // namespace cpu
}  // namespace fastbound
