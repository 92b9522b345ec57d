// The continuous noise formulas (csrc/include/fastbound/continuous.h) on GCC
// vector lanes, for the CPU kernels.
//
// GCC vectorises the scalar formulas' loop eight lanes wide, but each vector
// then runs one long dependent chain (log's Horner polynomial, sqrt, sincos)
// that the out-of-order window does not overlap with the next. `VecMath`
// evaluates the same formulas, the same operations in the same order, on
// kWidth = 32 lanes, which GCC lowers to four interleaved AVX2 registers (eight
// SSE2 ones, two AVX-512 ones): on one core of a Zen 1 EPYC, perturb's
// Gaussian-law transform takes 4.0-4.6 ns an element against 6.0 for the
// scalar loop (16 lanes: 4.9; 64: spills). Its results are bit-identical to the
// scalar formulas' (checked over every value of the words' 24 used bits).
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
typedef float f32xw __attribute__((vector_size(4 * kWidth)));
typedef int32_t i32xw __attribute__((vector_size(4 * kWidth)));
typedef uint32_t u32xw __attribute__((vector_size(4 * kWidth)));

// continuous.h's lane type (log_lanes, sincos_lanes) and noise math (noise_of, eps_of) on kWidth floats.
struct VecMath {
  using E = float;
  using F = f32xw;
  using I = i32xw;
  using U = u32xw;
  static FB_LANE I to_int(F x) { return __builtin_convertvector(x, I); }
  static FB_LANE F to_float(I i) { return __builtin_convertvector(i, F); }
  static FB_LANE I bits(F x) { return (I)x; }  // a vector cast reinterprets the bits
  static FB_LANE F from_bits(I i) { return (F)i; }
  static FB_LANE F u24(U u) { return to_float((I)u); }  // u < 2^24: exact through int32
  static FB_LANE F log(F x) { return continuous::log_lanes<VecMath>(x); }
  static FB_LANE F sqrt(F x) {
    F r;
    for (int k = 0; k < kWidth; ++k) r[k] = __builtin_sqrtf(x[k]);  // one vsqrtps per register
    return r;
  }
  static FB_LANE void sincos(F x, F* s, F* c) { continuous::sincos_lanes<VecMath>(x, s, c); }
  static FB_LANE F abs(F x) { return from_bits(bits(x) & 0x7FFFFFFF); }
  static FB_LANE F copysign(F x, F y) { return from_bits((bits(x) & 0x7FFFFFFF) | (bits(y) & INT32_MIN)); }
};

FB_LANE u32xw load_words(const uint32_t* p) {
  u32xw v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

// kWidth values of any dtype as floats, and back (unaligned), by convert.h's eight-lane moves.
template <typename scalar_t>
FB_LANE f32xw load(const scalar_t* p) {
  f32xw v;
  for (int64_t k = 0; k < kWidth; k += kLanes) {
    const f32x8 part = load8(p + k);
    std::memcpy(reinterpret_cast<char*>(&v) + 4 * k, &part, sizeof part);
  }
  return v;
}
template <typename scalar_t>
FB_LANE void store(scalar_t* p, f32xw v) {
  for (int64_t k = 0; k < kWidth; k += kLanes) {
    f32x8 part;
    std::memcpy(&part, reinterpret_cast<const char*>(&v) + 4 * k, sizeof part);
    store8(p + k, part);
  }
}

// Float and bfloat16 move in 16-lane parts: assembling the 32 lanes from 8-lane ones, as above
// (for float16), goes through the stack, whose 256-bit stores a 512-bit reload cannot forward,
// and a shuffle joining two 16-lane halves is lowered lane by lane. The bfloat16 store takes
// float_to_bf16_bits's wide form: sixteen lanes exceed the registers of every target but AVX-512.
FB_LANE f32xw load(const float* p) {
  f32xw v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
FB_LANE void store(float* p, f32xw v) { std::memcpy(p, &v, sizeof v); }
FB_LANE f32xw load(const c10::BFloat16* p) {
  f32xw v;
  for (int64_t k = 0; k < kWidth; k += 16) {
    u16x16 h;
    std::memcpy(&h, p + k, sizeof h);
    const u32x16 part = widen(h) << 16;
    std::memcpy(reinterpret_cast<char*>(&v) + 4 * k, &part, sizeof part);
  }
  return v;
}
FB_LANE void store(c10::BFloat16* p, f32xw v) {
  for (int64_t k = 0; k < kWidth; k += 16) {
    f32x16 part;
    std::memcpy(&part, reinterpret_cast<const char*>(&v) + 4 * k, sizeof part);
    const u16x16 h = narrow(float_to_bf16_bits</*kWide=*/true>(part));
    std::memcpy(p + k, &h, sizeof h);
  }
}

// eps of n elements from their words w0, w1 (continuous::eps_of), rounded to scalar_t:
// in float on the vector lanes (the last n mod kWidth on one float, bit-identical but
// for where GCC fuses a multiply and an add), in double for a double out. Always
// inlined, so it takes the ISA of the caller (an FB_CPU_CLONES loop).
template <typename scalar_t>
FB_LANE void eps_lanes(const uint32_t* w0, const uint32_t* w1, int64_t n, scalar_t* out) {
  using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
  int64_t j = 0;
  if constexpr (std::is_same_v<acc_t, float>) {
    for (; j + kWidth <= n; j += kWidth) store(out + j, continuous::eps_of<VecMath>(load_words(w0 + j), load_words(w1 + j)));
  }
  for (; j < n; ++j) out[j] = from_acc<scalar_t>(continuous::eps_only<acc_t>(w0[j], w1[j]));
}

#undef FB_LANE

}  // namespace continuous_lanes
}  // namespace cpu
}  // namespace fastbound
