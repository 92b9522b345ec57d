// The Philox words of a run of consecutive elements (the continuous noise
// contract, csrc/include/fastbound/continuous.h), for the CPU kernels.
//
// GCC vectorises philox.h's host loop into 64-bit lanes but multiplies them by
// the round constants with shifts and adds (AVX2 has no 64-bit multiply), about
// 100 ns an element. The AVX2 form below runs eight counters in 32-bit lanes:
// _mm256_mul_epu32 gives the full 32x32->64 products of the even lanes, and of
// the odd lanes moved down by a shuffle (port 5, beside the multiplies' ports);
// blends regroup their low and high halves. About 6x faster (7 vs 45 ns an
// element, one busy core).
// It is the same integer function, so its words are bit-identical to philox.h's
// (tests/test_continuous_kernels.py compares them with the oracle's). CPUs
// without AVX2 take philox.h's loop, unvectorised (the scalar multiply is fast).
#pragma once

#include <immintrin.h>

#include <cstdint>

#include "fastbound/continuous.h"

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

// Words of counters n .. n + 8k - 1 (n = offset + first): w0, w1 and (when not null) w2.
__attribute__((target("avx2"))) inline void words_avx2(uint32_t k0, uint32_t k1, uint64_t n, int64_t count,
                                                       uint32_t* w0, uint32_t* w1, uint32_t* w2) {
  const __m256i m0 = _mm256_set1_epi32(static_cast<int>(philox::kMul0));
  const __m256i m1 = _mm256_set1_epi32(static_cast<int>(philox::kMul1));
  const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  const __m256i bias = _mm256_set1_epi32(static_cast<int>(0x80000000u));  // unsigned compare by signed
  for (int64_t j = 0; j + 8 <= count; j += 8, n += 8) {
    // Low and high counter words of n + lane: the low word wraps past 2^32 in at most one step.
    const __m256i base_lo = _mm256_set1_epi32(static_cast<int>(static_cast<uint32_t>(n)));
    __m256i c0 = _mm256_add_epi32(base_lo, lane);
    const __m256i carry = _mm256_cmpgt_epi32(_mm256_xor_si256(base_lo, bias), _mm256_xor_si256(c0, bias));
    __m256i c1 = _mm256_sub_epi32(_mm256_set1_epi32(static_cast<int>(static_cast<uint32_t>(n >> 32))), carry);
    __m256i c2 = _mm256_setzero_si256(), c3 = _mm256_setzero_si256();
    uint32_t key0 = k0, key1 = k1;
#pragma GCC unroll 10
    for (int r = 0; r < philox::kRounds; ++r) {
      __m256i hi0, lo0, hi1, lo1;
      mulhilo8(c0, m0, &hi0, &lo0);
      mulhilo8(c2, m1, &hi1, &lo1);
      c0 = _mm256_xor_si256(_mm256_xor_si256(hi1, c1), _mm256_set1_epi32(static_cast<int>(key0)));
      c1 = lo1;
      c2 = _mm256_xor_si256(_mm256_xor_si256(hi0, c3), _mm256_set1_epi32(static_cast<int>(key1)));
      c3 = lo0;
      key0 += philox::kWeyl0;
      key1 += philox::kWeyl1;
    }
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(w0 + j), c0);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(w1 + j), c1);
    if (w2 != nullptr) _mm256_storeu_si256(reinterpret_cast<__m256i*>(w2 + j), c2);
  }
}

inline bool has_avx2() {
  static const bool yes = __builtin_cpu_supports("avx2");
  return yes;
}
#endif

// philox.h's loop, kept scalar: vectorised, it would emulate the 64-bit multiplies.
__attribute__((optimize("no-tree-vectorize"))) inline void words_scalar(uint64_t seed, uint64_t offset,
                                                                        uint64_t first, int64_t begin, int64_t end,
                                                                        uint32_t* w0, uint32_t* w1, uint32_t* w2) {
  for (int64_t j = begin; j < end; ++j) {
    const philox::Words w = continuous::element_words(seed, offset, first + static_cast<uint64_t>(j));
    w0[j] = w.w0;
    w1[j] = w.w1;
    if (w2 != nullptr) w2[j] = w.w2;
  }
}

}  // namespace continuous_words

// Words w0, w1 (and w2 when not null) of elements first .. first + n - 1 of a call with (seed, offset).
inline void continuous_tile_words(uint64_t seed, uint64_t offset, uint64_t first, int64_t n, uint32_t* w0,
                                  uint32_t* w1, uint32_t* w2) {
  int64_t done = 0;
#if defined(FB_WORDS_AVX2)
  if (continuous_words::has_avx2()) {
    const uint64_t key = seed ^ continuous::kKeySalt;
    continuous_words::words_avx2(static_cast<uint32_t>(key), static_cast<uint32_t>(key >> 32), offset + first, n, w0,
                                 w1, w2);
    done = n - n % 8;
  }
#endif
  continuous_words::words_scalar(seed, offset, first, done, n, w0, w1, w2);
}

}  // namespace cpu
}  // namespace fastbound
