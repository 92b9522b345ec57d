// Branch-free conversions between the 16-bit float formats and float, written
// with integer and float arithmetic only, once for one value and for the 8 or
// 16 lanes of a GCC vector (vectorize.h), so that the row loops convert with
// vector instructions at every x86-64 level (c10's own conversions do not
// vectorise there), with the same formula, hence the same bits, at every width.
// `load_lanes<L>` / `store_lanes<L>` move one vector of a lane policy L of
// scores of any dtype as floats; `load8` / `store8` are the 8-lane ones.
// The 16-lane row loops on an AVX512_BF16 CPU store bfloat16 by its vcvtneps2bf16
// instead, falling back to these where it would differ (subnormals, which it
// flushes to zero; NaN, whose sign it keeps): row_pass.cpp store_bf16_native.
//
// bfloat16: the high half of a float; rounding to nearest even, NaN kept quiet.
// IEEE half: the exponent-rebias method of M. Dukhan's FP16 library, which
// handles normals, subnormals, infinities and NaN without branches.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <cstring>
#include <type_traits>

#if defined(__x86_64__)
#include <emmintrin.h>
#endif

#include "vectorize.h"

#define FB_INLINE inline __attribute__((always_inline))

namespace fastbound {
namespace cpu {

FB_INLINE float bits_to_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}
FB_INLINE f32x8 bits_to_float(u32x8 u) { return (f32x8)u; }
FB_INLINE f32x16 bits_to_float(u32x16 u) { return (f32x16)u; }

FB_INLINE uint32_t float_to_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
}
FB_INLINE u32x8 float_to_bits(f32x8 f) { return (u32x8)f; }
FB_INLINE u32x16 float_to_bits(f32x16 f) { return (u32x16)f; }

// U: uint32_t, u32x8 or u32x16 holding 16-bit patterns in the low half of each
// lane; F: float, f32x8 or f32x16.
template <typename U>
FB_INLINE auto bf16_bits_to_float(U h) {
  return bits_to_float(h << 16);
}

template <typename U>
FB_INLINE auto half_bits_to_float(U h) {
  const U w = h << 16;
  const U sign = w & 0x80000000u;
  const U two_w = w + w;
  // Normal numbers: shift the exponent and mantissa into place, then rescale
  // the exponent bias (15 -> 127) with one multiplication.
  const auto normalized = bits_to_float((two_w >> 4) + (0xE0u << 23)) * 0x1.0p-112f;
  // Subnormals: place the mantissa under a magic exponent and subtract it.
  const auto denormalized = bits_to_float((two_w >> 17) | (126u << 23)) - 0.5f;
  const U result = two_w < (1u << 27) ? float_to_bits(denormalized) : float_to_bits(normalized);
  return bits_to_float(sign | result);
}

// kWide: x may be wider than the target's registers, whose selects GCC 12 splits into scalar
// lanes; the NaN test is then integer arithmetic (|x|'s bits above infinity's make
// 0x7F800000 - |x| negative, and an arithmetic shift spreads its sign over the lane), at the
// cost of two more instructions than the select at native widths.
template <bool kWide = false, typename F>
FB_INLINE auto float_to_bf16_bits(F x) {
  using U = decltype(float_to_bits(x));
  const U u = float_to_bits(x);
  const U rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
  if constexpr (kWide) {
    static_assert(std::is_same_v<F, f32x16>, "the wide form is written for sixteen lanes");
    const U nan = (U)((0x7F800000 - (i32x16)(u & 0x7FFFFFFFu)) >> 31);
    return (rounded & ~nan) | (nan & 0x7FC0u);
  } else {
    return x != x ? U{} + 0x7FC0u : rounded;
  }
}

template <typename F>
FB_INLINE auto float_to_half_bits(F x) {
  using U = decltype(float_to_bits(x));
  const U w = float_to_bits(x);
  const U shl1_w = w + w;
  const U sign = w & 0x80000000u;
  // Scaling up then down rounds the mantissa to 10 bits (or to the subnormal
  // grid) in the FPU, with overflow going to infinity.
  F base = (bits_to_float(w & 0x7FFFFFFFu) * 0x1.0p+112f) * 0x1.0p-110f;
  U bias = shl1_w & 0xFF000000u;
  bias = bias < 0x71000000u ? U{} + 0x71000000u : bias;
  base = bits_to_float((bias >> 1) + 0x07800000u) + base;
  const U b = float_to_bits(base);
  const U nonsign = ((b >> 13) & 0x00007C00u) + (b & 0x00000FFFu);
  return (sign >> 16) | (shl1_w > 0xFF000000u ? U{} + 0x7E00u : nonsign);
}

// Loads as the accumulation type.
FB_INLINE float to_acc(float x) { return x; }
FB_INLINE double to_acc(double x) { return x; }
FB_INLINE float to_acc(c10::BFloat16 x) { return bf16_bits_to_float(static_cast<uint32_t>(x.x)); }
FB_INLINE float to_acc(c10::Half x) { return half_bits_to_float(static_cast<uint32_t>(x.x)); }

// Stores from the accumulation type, rounding to nearest even.
template <typename scalar_t>
FB_INLINE scalar_t from_acc(float x);

template <>
FB_INLINE float from_acc<float>(float x) {
  return x;
}

template <typename scalar_t>
FB_INLINE scalar_t from_acc(double x) {
  return static_cast<scalar_t>(x);
}

template <>
FB_INLINE c10::BFloat16 from_acc<c10::BFloat16>(float x) {
  return c10::BFloat16(static_cast<uint16_t>(float_to_bf16_bits(x)), c10::BFloat16::from_bits());
}

template <>
FB_INLINE c10::Half from_acc<c10::Half>(float x) {
  return c10::Half(static_cast<uint16_t>(float_to_half_bits(x)), c10::Half::from_bits());
}

// L::kWidth consecutive scores as floats, and back (unaligned).
template <typename L>
FB_INLINE typename L::F load_lanes(const float* p) {
  typename L::F v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

// 16-bit patterns zero-extended to 32-bit lanes, and back (the low half of
// each lane). At 16 lanes as interleaves with zeros (x86 is little-endian):
// one vpmovzxwd / vpmovdw each, where GCC 12 splits __builtin_convertvector
// of this width into halves.
FB_INLINE u32x8 widen(u16x8 h) { return __builtin_convertvector(h, u32x8); }
FB_INLINE u32x16 widen(u16x16 h) {
  const u16x16 z{};
  return (u32x16)__builtin_shufflevector(h, z, 0, 16, 1, 16, 2, 16, 3, 16, 4, 16, 5, 16, 6, 16, 7, 16, 8, 16, 9, 16,
                                         10, 16, 11, 16, 12, 16, 13, 16, 14, 16, 15, 16);
}
FB_INLINE u16x8 narrow(u32x8 u) { return __builtin_convertvector(u, u16x8); }
FB_INLINE u16x16 narrow(u32x16 u) {
  const u16x32 w = (u16x32)u;
  return __builtin_shufflevector(w, w, 0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
}

template <typename L>
FB_INLINE typename L::U load_lanes_bits(const void* p) {
  typename L::H h;
  std::memcpy(&h, p, sizeof h);
  return widen(h);
}
template <typename L>
FB_INLINE typename L::F load_lanes(const c10::BFloat16* p) {
  return bf16_bits_to_float(load_lanes_bits<L>(p));
}
template <typename L>
FB_INLINE typename L::F load_lanes(const c10::Half* p) {
  return half_bits_to_float(load_lanes_bits<L>(p));
}

template <typename L>
FB_INLINE void store_lanes(float* p, typename L::F v) {
  std::memcpy(p, &v, sizeof v);
}

template <typename L>
FB_INLINE void store_lanes_bits(void* p, typename L::U bits) {
  const typename L::H h = narrow(bits);
  std::memcpy(p, &h, sizeof h);
}
template <typename L>
FB_INLINE void store_lanes(c10::BFloat16* p, typename L::F v) {
  store_lanes_bits<L>(p, float_to_bf16_bits(v));
}
template <typename L>
FB_INLINE void store_lanes(c10::Half* p, typename L::F v) {
  store_lanes_bits<L>(p, float_to_half_bits(v));
}

// store_lanes of 16-bit values by non-temporal stores, which write a line without reading it
// first (x86-64; elsewhere ordinary stores); p aligned to 16 bytes.
template <typename L>
FB_INLINE void stream_packed(void* p, typename L::H h) {
#if defined(__x86_64__)
  static_assert(sizeof h % 16 == 0, "whole 16-byte stores");
  for (size_t k = 0; k < sizeof h; k += 16) {
    __m128i part;
    std::memcpy(&part, reinterpret_cast<const char*>(&h) + k, sizeof part);
    _mm_stream_si128(reinterpret_cast<__m128i*>(static_cast<char*>(p) + k), part);
  }
#else
  std::memcpy(p, &h, sizeof h);
#endif
}
template <typename L>
FB_INLINE void stream_lanes_bits(void* p, typename L::U bits) {
  stream_packed<L>(p, narrow(bits));
}
template <typename L, typename scalar_t>
FB_INLINE void stream_lanes(scalar_t* p, typename L::F v) {
  static_assert(sizeof(scalar_t) == 2, "16-bit values");
  if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
    stream_lanes_bits<L>(p, float_to_bf16_bits(v));
  } else {
    stream_lanes_bits<L>(p, float_to_half_bits(v));
  }
}

// Orders the non-temporal stores before what follows (they are weakly ordered).
FB_INLINE void stream_fence() {
#if defined(__x86_64__)
  _mm_sfence();
#endif
}

// Eight consecutive scores as floats, and back.
template <typename scalar_t>
FB_INLINE f32x8 load8(const scalar_t* p) {
  return load_lanes<VecLanes>(p);
}
template <typename scalar_t>
FB_INLINE void store8(scalar_t* p, f32x8 v) {
  store_lanes<VecLanes>(p, v);
}

}  // namespace cpu
}  // namespace fastbound

#undef FB_INLINE
