// The Philox words of a run of consecutive counters, for the CPU kernels: the
// continuous noise (csrc/include/fastbound/continuous.h, `continuous_tile_words`)
// and the discrete perturb (philox.h's contract, `philox_tile_words`).
//
// GCC vectorises philox.h's host loop into 64-bit lanes but multiplies them by
// the round constants with shifts and adds (AVX2 has no 64-bit multiply), about
// 100 ns an element. The AVX2 form below runs eight counters in 32-bit lanes:
// _mm256_mul_epu32 gives the full 32x32->64 products of the even lanes, and of
// the odd lanes moved down by a shuffle; blends regroup their low and high
// halves. Two such groups run interleaved beside two counters in scalar
// registers (words_block): 5.3 ns an element with w2, 4.9 without, on one core
// of a Zen 1 EPYC (one group alone: 6.4), where a 256-bit multiply issues every
// other cycle and bounds it at about 4 ns. On AVX-512 CPUs (x86-64-v4, as
// vectorize.h's wide_lanes() decides, so FASTBOUND_CPU_ISA=avx2 selects the AVX2
// form there) sixteen-counter groups take their place (words_avx512).
// Both are the same integer function, so their words are bit-identical to philox.h's
// (tests/test_continuous_kernels.py compares them with the oracle's, tests/test_cpu_isa.py
// the two forms with each other). CPUs without AVX2 take philox.h's loop, unvectorised
// (the scalar multiply is fast).
#pragma once

#include <immintrin.h>

#include <cstdint>

#include "fastbound/continuous.h"
#include "vectorize.h"

namespace fastbound {
namespace cpu {
namespace continuous_words {

#if defined(__x86_64__) && defined(__GNUC__)
#define FB_WORDS_AVX2 1

// (hi, lo) 32-bit halves of m * c in each of the eight 32-bit lanes of c.
__attribute__((target("avx2"), always_inline)) inline void mulhilo8(__m256i c, __m256i m, __m256i* hi, __m256i* lo) {
  const __m256i even = _mm256_mul_epu32(c, m);                         // lanes 0, 2, 4, 6 as 64-bit products
  const __m256i odd = _mm256_mul_epu32(_mm256_shuffle_epi32(c, 0xF5), m);  // lanes 1, 3, 5, 7
  *hi = _mm256_blend_epi32(_mm256_shuffle_epi32(even, 0xF5), odd, 0xAA);
  *lo = _mm256_blend_epi32(even, _mm256_slli_epi64(odd, 32), 0xAA);
}

// Words of counters n .. n + 8G + S - 1: 8G in G groups of eight AVX2 lanes, interleaved
// so that one group's multiplies overlap another's shuffles, and S in 64-bit scalar
// registers (philox.h's host rounds), whose integer multiplier runs beside the vector
// one. Stores w0, w1 and, when kW2, w2; without w2 the last round skips the product
// that forms only w2 and w3.
template <int G, int S, bool kW2>
__attribute__((target("avx2"), always_inline)) inline void words_block(uint32_t k0, uint32_t k1, uint64_t n,
                                                                       uint32_t* w0, uint32_t* w1, uint32_t* w2) {
  const __m256i m0 = _mm256_set1_epi32(static_cast<int>(philox::kMul0));
  const __m256i m1 = _mm256_set1_epi32(static_cast<int>(philox::kMul1));
  const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  const __m256i bias = _mm256_set1_epi32(static_cast<int>(0x80000000u));  // unsigned compare by signed
  __m256i c0[G], c1[G], c2[G], c3[G];
  for (int g = 0; g < G; ++g) {
    // Low and high counter words of n + 8g + lane: the low word wraps past 2^32 in at most one step.
    const uint64_t base = n + 8 * g;
    const __m256i base_lo = _mm256_set1_epi32(static_cast<int>(static_cast<uint32_t>(base)));
    c0[g] = _mm256_add_epi32(base_lo, lane);
    const __m256i carry = _mm256_cmpgt_epi32(_mm256_xor_si256(base_lo, bias), _mm256_xor_si256(c0[g], bias));
    c1[g] = _mm256_sub_epi32(_mm256_set1_epi32(static_cast<int>(static_cast<uint32_t>(base >> 32))), carry);
    c2[g] = c3[g] = _mm256_setzero_si256();
  }
  constexpr uint64_t kLow = 0xFFFFFFFFu;
  uint64_t s0[S > 0 ? S : 1], s1[S > 0 ? S : 1], s2[S > 0 ? S : 1], s3[S > 0 ? S : 1];
  for (int q = 0; q < S; ++q) {
    const uint64_t counter = n + 8 * G + q;
    s0[q] = counter & kLow;
    s1[q] = counter >> 32;
    s2[q] = s3[q] = 0;
  }
  uint32_t key0 = k0, key1 = k1;
#pragma GCC unroll 10
  for (int r = 0; r < philox::kRounds; ++r) {
    const bool both = kW2 || r + 1 < philox::kRounds;
    const __m256i kv0 = _mm256_set1_epi32(static_cast<int>(key0)), kv1 = _mm256_set1_epi32(static_cast<int>(key1));
    for (int g = 0; g < G; ++g) {
      __m256i hi0, lo0, hi1, lo1;
      mulhilo8(c2[g], m1, &hi1, &lo1);
      if (both) mulhilo8(c0[g], m0, &hi0, &lo0);
      c0[g] = _mm256_xor_si256(_mm256_xor_si256(hi1, c1[g]), kv0);
      c1[g] = lo1;
      if (both) {
        c2[g] = _mm256_xor_si256(_mm256_xor_si256(hi0, c3[g]), kv1);
        c3[g] = lo0;
      }
    }
    for (int q = 0; q < S; ++q) {
      const uint64_t p1 = uint64_t{philox::kMul1} * (s2[q] & kLow);
      if (both) {
        const uint64_t p0 = uint64_t{philox::kMul0} * (s0[q] & kLow);
        s2[q] = (p0 >> 32) ^ s3[q] ^ key1;
        s3[q] = p0;
      }
      s0[q] = (p1 >> 32) ^ s1[q] ^ key0;
      s1[q] = p1;
    }
    key0 += philox::kWeyl0;
    key1 += philox::kWeyl1;
  }
  for (int g = 0; g < G; ++g) {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(w0 + 8 * g), c0[g]);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(w1 + 8 * g), c1[g]);
    if (kW2) _mm256_storeu_si256(reinterpret_cast<__m256i*>(w2 + 8 * g), c2[g]);
  }
  for (int q = 0; q < S; ++q) {
    w0[8 * G + q] = static_cast<uint32_t>(s0[q]);
    w1[8 * G + q] = static_cast<uint32_t>(s1[q]);
    if (kW2) w2[8 * G + q] = static_cast<uint32_t>(s2[q]);
  }
}

// Words of counters n .. n + count - 1, in blocks of two vector groups and two scalar
// counters (on a Zen 1 EPYC 5.2 ns an element, against 6.4 for one group alone), then of
// one group; returns how many it wrote (all but count mod 8 at most). Scalar code: GCC
// would vectorise the scalar counters' 64-bit multiplies into emulated ones.
template <bool kW2>
__attribute__((target("avx2"), optimize("no-tree-vectorize"))) inline int64_t words_avx2(
    uint32_t k0, uint32_t k1, uint64_t n, int64_t count, uint32_t* w0, uint32_t* w1, uint32_t* w2) {
  constexpr int64_t kBlock = 18;
  int64_t j = 0;
  for (; j + kBlock <= count; j += kBlock) words_block<2, 2, kW2>(k0, k1, n + j, w0 + j, w1 + j, kW2 ? w2 + j : nullptr);
  for (; j + 8 <= count; j += 8) words_block<1, 0, kW2>(k0, k1, n + j, w0 + j, w1 + j, kW2 ? w2 + j : nullptr);
  return j;
}

// The same on AVX-512 (x86-64-v4 CPUs, vectorize.h's wide_lanes()): sixteen counters a
// zmm group. _mm512_mul_epu32 gives the products of the even lanes, and of the odd lanes
// moved down by a 64-bit shift; one merge-masked shuffle each gathers their high and their
// low halves, and one ternary-logic op forms hi ^ c ^ key, so that a round of a group is
// twelve instructions for sixteen counters (the AVX2 form: eighteen for eight). On an
// Intel Xeon with AVX-512 (Sapphire Rapids class, one core) that is 1.0-1.1 ns an element
// against 1.9-2.1 for words_avx2: about the bound of the two ports that execute 512-bit
// operations at 4 GHz (6 cycles a round). One group alone, or three or four interleaved,
// run within a few percent of two; counters in scalar registers beside them (as in
// words_block) do not help there (two beside two groups: no faster; four: 25% slower).
// Round 0 is peeled: words 2 and 3 of the counter are 0, so is its word-2 product, and
// c0 = hi ^ key0, c1 = 0. Stores the lanes of `keep` of the last group (the tail of a
// count that is not a multiple of 16).
// _mm512_mul_epu32 and the shift _mm512_srli_epi64 in their zero-masking forms under a full
// mask (the same instructions, unmasked): the plain intrinsics merge into
// _mm512_undefined_epi32(), which draws GCC 12's -Wmaybe-uninitialized (its PR 105593).
__attribute__((target("avx512f"), always_inline)) inline __m512i mul_even(__m512i c, __m512i m) {
  return _mm512_maskz_mul_epu32(0xFF, c, m);
}
__attribute__((target("avx512f"), always_inline)) inline __m512i odd_down(__m512i c) {
  return _mm512_maskz_srli_epi64(0xFF, c, 32);
}

template <int G, bool kW2>
__attribute__((target("avx512f"), always_inline)) inline void words_block16(uint32_t k0, uint32_t k1, uint64_t n,
                                                                            uint32_t* w0, uint32_t* w1, uint32_t* w2,
                                                                            __mmask16 keep) {
  const __m512i m0 = _mm512_set1_epi32(static_cast<int>(philox::kMul0));
  const __m512i m1 = _mm512_set1_epi32(static_cast<int>(philox::kMul1));
  const __m512i lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  __m512i c0[G], c1[G], c2[G], c3[G];
  for (int g = 0; g < G; ++g) {
    // Counter (lo, hi, 0, 0) of n + 16g + lane: the low word wraps past 2^32 in at most one step.
    const uint64_t base = n + 16 * g;
    const __m512i base_lo = _mm512_set1_epi32(static_cast<int>(static_cast<uint32_t>(base)));
    const __m512i lo = _mm512_add_epi32(base_lo, lane);
    const __mmask16 carry = _mm512_cmplt_epu32_mask(lo, base_lo);
    const __m512i base_hi = _mm512_set1_epi32(static_cast<int>(static_cast<uint32_t>(base >> 32)));
    const __m512i hi = _mm512_mask_add_epi32(base_hi, carry, base_hi, _mm512_set1_epi32(1));
    const __m512i e0 = mul_even(lo, m0), o0 = mul_even(odd_down(lo), m0);
    c0[g] = _mm512_xor_si512(hi, _mm512_set1_epi32(static_cast<int>(k0)));
    c1[g] = _mm512_setzero_si512();
    c2[g] = _mm512_xor_si512(_mm512_mask_shuffle_epi32(o0, 0x5555, e0, _MM_PERM_DDBB),
                             _mm512_set1_epi32(static_cast<int>(k1)));
    c3[g] = _mm512_mask_shuffle_epi32(e0, 0xAAAA, o0, _MM_PERM_CCAA);
  }
  uint32_t key0 = k0, key1 = k1;
#pragma GCC unroll 9
  for (int r = 1; r < philox::kRounds; ++r) {
    key0 += philox::kWeyl0;
    key1 += philox::kWeyl1;
    const bool both = kW2 || r + 1 < philox::kRounds;
    const __m512i kv0 = _mm512_set1_epi32(static_cast<int>(key0)), kv1 = _mm512_set1_epi32(static_cast<int>(key1));
    for (int g = 0; g < G; ++g) {
      // e: the 64-bit products of lanes 2i; o: of lanes 2i + 1. hi takes the upper halves (DDBB:
      // 32-bit elements 1, 1, 3, 3 of e into the even lanes), lo the lower (CCAA: 0, 0, 2, 2 of o
      // into the odd lanes).
      const __m512i e1 = mul_even(c2[g], m1), o1 = mul_even(odd_down(c2[g]), m1);
      const __m512i hi1 = _mm512_mask_shuffle_epi32(o1, 0x5555, e1, _MM_PERM_DDBB);
      if (both) {
        const __m512i e0 = mul_even(c0[g], m0), o0 = mul_even(odd_down(c0[g]), m0);
        const __m512i hi0 = _mm512_mask_shuffle_epi32(o0, 0x5555, e0, _MM_PERM_DDBB);
        c2[g] = _mm512_ternarylogic_epi32(hi0, c3[g], kv1, 0x96);  // 0x96: a ^ b ^ c
        c3[g] = _mm512_mask_shuffle_epi32(e0, 0xAAAA, o0, _MM_PERM_CCAA);
      }
      c0[g] = _mm512_ternarylogic_epi32(hi1, c1[g], kv0, 0x96);
      c1[g] = _mm512_mask_shuffle_epi32(e1, 0xAAAA, o1, _MM_PERM_CCAA);
    }
  }
  for (int g = 0; g < G; ++g) {
    const __mmask16 k = g + 1 < G ? __mmask16(0xFFFF) : keep;
    _mm512_mask_storeu_epi32(w0 + 16 * g, k, c0[g]);
    _mm512_mask_storeu_epi32(w1 + 16 * g, k, c1[g]);
    if (kW2) _mm512_mask_storeu_epi32(w2 + 16 * g, k, c2[g]);
  }
}

// Words of counters n .. n + count - 1 (all of them): blocks of two interleaved groups,
// then one group, then one group that stores only the last count mod 16 lanes.
template <bool kW2>
__attribute__((target("avx512f"), optimize("no-tree-vectorize"))) inline void words_avx512(
    uint32_t k0, uint32_t k1, uint64_t n, int64_t count, uint32_t* w0, uint32_t* w1, uint32_t* w2) {
  int64_t j = 0;
  for (; j + 32 <= count; j += 32) words_block16<2, kW2>(k0, k1, n + j, w0 + j, w1 + j, kW2 ? w2 + j : nullptr, 0xFFFF);
  for (; j + 16 <= count; j += 16) words_block16<1, kW2>(k0, k1, n + j, w0 + j, w1 + j, kW2 ? w2 + j : nullptr, 0xFFFF);
  if (j < count) {
    const __mmask16 tail = static_cast<__mmask16>((1u << (count - j)) - 1);
    words_block16<1, kW2>(k0, k1, n + j, w0 + j, w1 + j, kW2 ? w2 + j : nullptr, tail);
  }
}

inline bool has_avx2() {
  static const bool yes = __builtin_cpu_supports("avx2");
  return yes;
}
#endif

// philox.h's loop, kept scalar: vectorised, it would emulate the 64-bit multiplies.
__attribute__((optimize("no-tree-vectorize"))) inline void words_scalar(uint64_t key, uint64_t n, int64_t begin,
                                                                        int64_t end, uint32_t* w0, uint32_t* w1,
                                                                        uint32_t* w2) {
  for (int64_t j = begin; j < end; ++j) {
    const philox::Words w = philox::element_words(key, n, static_cast<uint64_t>(j));
    w0[j] = w.w0;
    w1[j] = w.w1;
    if (w2 != nullptr) w2[j] = w.w2;
  }
}

}  // namespace continuous_words

// Words w0, w1 (and w2 when not null) of the Philox4x32-10 counters (lo, hi, 0, 0) of
// n .. n + count - 1 (mod 2^64) under the 64-bit `key` (philox.h's element_words(key, n, j)).
inline void philox_tile_words(uint64_t key, uint64_t n, int64_t count, uint32_t* w0, uint32_t* w1, uint32_t* w2) {
  int64_t done = 0;
#if defined(FB_WORDS_AVX2)
  const uint32_t k0 = static_cast<uint32_t>(key), k1 = static_cast<uint32_t>(key >> 32);
  if (wide_lanes()) {
    if (w2 != nullptr) {
      continuous_words::words_avx512<true>(k0, k1, n, count, w0, w1, w2);
    } else {
      continuous_words::words_avx512<false>(k0, k1, n, count, w0, w1, w2);
    }
    return;
  }
  if (continuous_words::has_avx2()) {
    done = w2 != nullptr ? continuous_words::words_avx2<true>(k0, k1, n, count, w0, w1, w2)
                         : continuous_words::words_avx2<false>(k0, k1, n, count, w0, w1, w2);
  }
#endif
  continuous_words::words_scalar(key, n, done, count, w0, w1, w2);
}

// Words w0, w1 (and w2 when not null) of elements first .. first + n - 1 of a continuous
// noise call with (seed, offset): continuous::element_words's salted key.
inline void continuous_tile_words(uint64_t seed, uint64_t offset, uint64_t first, int64_t n, uint32_t* w0,
                                  uint32_t* w1, uint32_t* w2) {
  philox_tile_words(seed ^ continuous::kKeySalt, offset + first, n, w0, w1, w2);
}

}  // namespace cpu
}  // namespace fastbound
