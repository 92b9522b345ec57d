// Branch-free conversions between the 16-bit float formats and float, written
// with integer and float arithmetic only so that GCC vectorises the loops that
// use them at every x86-64 level (c10's own conversions do not vectorise there).
//
// bfloat16: the high half of a float; rounding to nearest even, NaN kept quiet.
// IEEE half: the exponent-rebias method of M. Dukhan's FP16 library, which
// handles normals, subnormals, infinities and NaN without branches.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <cstring>

namespace fastbound {
namespace cpu {

inline __attribute__((always_inline)) float bits_to_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

inline __attribute__((always_inline)) uint32_t float_to_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
}

// Loads as the accumulation type.
inline __attribute__((always_inline)) float to_acc(float x) { return x; }
inline __attribute__((always_inline)) double to_acc(double x) { return x; }

inline __attribute__((always_inline)) float to_acc(c10::BFloat16 x) {
  return bits_to_float(static_cast<uint32_t>(x.x) << 16);
}

inline __attribute__((always_inline)) float to_acc(c10::Half x) {
  const uint32_t w = static_cast<uint32_t>(x.x) << 16;
  const uint32_t sign = w & 0x80000000u;
  const uint32_t two_w = w + w;
  // Normal numbers: shift the exponent and mantissa into place, then rescale
  // the exponent bias (15 -> 127) with one multiplication.
  const float normalized = bits_to_float((two_w >> 4) + (0xE0u << 23)) * 0x1.0p-112f;
  // Subnormals: place the mantissa under a magic exponent and subtract it.
  const float denormalized = bits_to_float((two_w >> 17) | (126u << 23)) - 0.5f;
  const uint32_t result = two_w < (1u << 27) ? float_to_bits(denormalized) : float_to_bits(normalized);
  return bits_to_float(sign | result);
}

// Stores from the accumulation type, rounding to nearest even.
template <typename scalar_t>
inline __attribute__((always_inline)) scalar_t from_acc(float x);

template <>
inline __attribute__((always_inline)) float from_acc<float>(float x) {
  return x;
}

template <typename scalar_t>
inline __attribute__((always_inline)) scalar_t from_acc(double x) {
  return static_cast<scalar_t>(x);
}

template <>
inline __attribute__((always_inline)) c10::BFloat16 from_acc<c10::BFloat16>(float x) {
  const uint32_t u = float_to_bits(x);
  const uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
  const uint16_t bits = x != x ? uint16_t(0x7FC0) : static_cast<uint16_t>(rounded);
  return c10::BFloat16(bits, c10::BFloat16::from_bits());
}

template <>
inline __attribute__((always_inline)) c10::Half from_acc<c10::Half>(float x) {
  const uint32_t w = float_to_bits(x);
  const uint32_t shl1_w = w + w;
  const uint32_t sign = w & 0x80000000u;
  // Scaling up then down rounds the mantissa to 10 bits (or to the subnormal
  // grid) in the FPU, with overflow going to infinity.
  float base = (__builtin_fabsf(x) * 0x1.0p+112f) * 0x1.0p-110f;
  uint32_t bias = shl1_w & 0xFF000000u;
  bias = bias < 0x71000000u ? 0x71000000u : bias;
  base = bits_to_float((bias >> 1) + 0x07800000u) + base;
  const uint32_t b = float_to_bits(base);
  const uint32_t nonsign = ((b >> 13) & 0x00007C00u) + (b & 0x00000FFFu);
  const uint32_t h = (sign >> 16) | (shl1_w > 0xFF000000u ? 0x7E00u : nonsign);
  return c10::Half(static_cast<uint16_t>(h), c10::Half::from_bits());
}

}  // namespace cpu
}  // namespace fastbound
