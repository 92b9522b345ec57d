// Counter-based random numbers for fastbound's noise kernels: Philox4x32-10 and
// the rules that turn its words into noise decisions.
//
// Philox4x32-10 is the counter-based generator of Salmon, Moraes, Dror & Shaw,
// "Parallel random numbers: as easy as 1, 2, 3" (SC 2011; the Random123
// library). It maps a 128-bit counter and a 64-bit key to four 32-bit words by
// ten rounds of multiply-hi/lo, xor and key bumps, so any element's randomness
// is a pure function of (key, counter): no state, no sequential dependency.
// Header-only, torch-free and `__host__ __device__`, so the C++ CPU kernels
// and the CUDA kernels compute the same words from the same inputs; the Triton
// kernels use Triton's `tl.randint4x`, which is the same function with the
// same word layout (checked by the known-answer tests).
//
// THE NOISE CONTRACT (every backend, and `fastbound.reference`, follows it):
//
//   key      (k0, k1)         = (seed mod 2^32, seed div 2^32), seed a uint64
//   counter  (c0, c1, c2, c3) = (lo, hi, 0, 0) of n = (offset + i) mod 2^64,
//            where i is the element's flat (row-major) index in the call,
//            and offset a uint64 the caller chooses.
//            This is exactly Triton's `tl.randint4x(seed, offset + i)`.
//   words    (w0, w1, w2, w3) = Philox4x32-10(counter, key)
//
//   A call over N elements uses the counters offset .. offset + N - 1; a
//   caller drawing again with the same seed passes offset + N next.
//
//   w0, the selection word:
//     * uniform float  u = (w0 >> 8) * 2^-24, a multiple of 2^-24 in [0, 1),
//       never 1 (uniform_f32 below; the time samplers use it);
//     * Bernoulli(p)   selected iff u < p, evaluated exactly in integers as
//       (w0 >> 8) < T with T = ceil(p * 2^24) in [0, 2^24] (bernoulli below;
//       the caller computes T from p, so no backend evaluates exp itself);
//     * exact-k        the k maskable elements of a row with the smallest
//       (w0, column) pairs, compared lexicographically (column breaks ties).
//   w1, the token word: a uniform token in [0, V) is floor(w1 * V / 2^32)
//     (uniform_below below), exact integer arithmetic on every backend.
//   w2, w3: unused by the noise kernels.
//
//   The time samplers of fastbound/noise.py read w0 of counters offset + i too:
//   `sample_times` through u, `sample_num_masked` as documented there.
#pragma once

#include <cstdint>

#include "fastbound/host_device.h"

namespace fastbound {
namespace philox {

// Philox4x32 round multipliers and Weyl key increments (Salmon et al. 2011; the
// constants of Random123's philox4x32).
constexpr uint32_t kMul0 = 0xD2511F53u;
constexpr uint32_t kMul1 = 0xCD9E8D57u;
constexpr uint32_t kWeyl0 = 0x9E3779B9u;
constexpr uint32_t kWeyl1 = 0xBB67AE85u;
constexpr int kRounds = 10;

struct Words {
  uint32_t w0, w1, w2, w3;
};

FB_HD uint32_t mulhi(uint32_t a, uint32_t b) {
#if defined(__CUDA_ARCH__)
  return __umulhi(a, b);
#else
  return static_cast<uint32_t>((static_cast<uint64_t>(a) * b) >> 32);
#endif
}

// Philox4x32-10 of a full 128-bit counter under key (k0, k1). One round:
//   (c0, c1, c2, c3) <- (hi(M1 c2) ^ c1 ^ k0, lo(M1 c2), hi(M0 c0) ^ c3 ^ k1, lo(M0 c0)),
// then the key is bumped by the Weyl constants; ten rounds.
#if defined(__CUDA_ARCH__)
FB_HD Words philox4x32_10(Words c, uint32_t k0, uint32_t k1) {
#pragma unroll
  for (int r = 0; r < kRounds; ++r) {
    const uint32_t hi0 = __umulhi(kMul0, c.w0), lo0 = kMul0 * c.w0;
    const uint32_t hi1 = __umulhi(kMul1, c.w2), lo1 = kMul1 * c.w2;
    c = Words{hi1 ^ c.w1 ^ k0, lo1, hi0 ^ c.w3 ^ k1, lo0};
    k0 += kWeyl0;
    k1 += kWeyl1;
  }
  return c;
}
#else
// Host form of the same rounds: each word lives in the low half of a 64-bit
// lane, so one 32x32->64 product gives both lo and hi, and a loop over
// elements vectorises to vpmuludq (about 1.6x faster than 32-bit lanes on
// AVX-512). The upper halves carry junk that never reaches a low half: products
// read only the low 32 bits of their operand, and the result is truncated.
FB_HD Words philox4x32_10(Words counter, uint32_t k0, uint32_t k1) {
  constexpr uint64_t kLow = 0xFFFFFFFFu;
  uint64_t c0 = counter.w0, c1 = counter.w1, c2 = counter.w2, c3 = counter.w3;
  uint64_t key0 = k0, key1 = k1;
#if defined(__CUDACC__)
#pragma unroll
#else
#pragma GCC unroll 16
#endif
  for (int r = 0; r < kRounds; ++r) {
    const uint64_t p0 = uint64_t{kMul0} * (c0 & kLow), p1 = uint64_t{kMul1} * (c2 & kLow);
    c0 = (p1 >> 32) ^ c1 ^ key0;
    c1 = p1;
    c2 = (p0 >> 32) ^ c3 ^ key1;
    c3 = p0;
    key0 += kWeyl0;
    key1 += kWeyl1;
  }
  return Words{static_cast<uint32_t>(c0), static_cast<uint32_t>(c1), static_cast<uint32_t>(c2),
               static_cast<uint32_t>(c3)};
}
#endif

// The words of element `index` of a call with this seed and offset (the contract above).
FB_HD Words element_words(uint64_t seed, uint64_t offset, uint64_t index) {
  const uint64_t n = offset + index;  // wraps mod 2^64 by definition
  const Words counter{static_cast<uint32_t>(n), static_cast<uint32_t>(n >> 32), 0u, 0u};
  return philox4x32_10(counter, static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32));
}

// The raw generator op (`philox4x32`): row i of an (n, 4) int64 counter
// table (each entry's low 32 bits) to its four words, stored as int64.
FB_HD void counter_row_words(const int64_t* counter, int64_t* out, uint64_t seed) {
  const Words w = philox4x32_10(Words{static_cast<uint32_t>(counter[0]), static_cast<uint32_t>(counter[1]),
                                      static_cast<uint32_t>(counter[2]), static_cast<uint32_t>(counter[3])},
                                static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32));
  out[0] = w.w0;
  out[1] = w.w1;
  out[2] = w.w2;
  out[3] = w.w3;
}

// u = (w >> 8) * 2^-24: the 24 high bits as a float in [0, 1), exactly
// representable, never 1.
FB_HD float uniform_f32(uint32_t w) { return static_cast<float>(w >> 8) * 5.9604644775390625e-8f; }

// The Bernoulli rule u < p, with threshold = ceil(p * 2^24) in [0, 2^24].
FB_HD bool bernoulli(uint32_t w, uint32_t threshold) { return (w >> 8) < threshold; }

// floor(w * n / 2^32): a uniform integer in [0, n) from a uniform 32-bit word
// (multiply-shift; each value has probability within n / 2^32 of 1/n).
FB_HD uint32_t uniform_below(uint32_t w, uint32_t n) { return mulhi(w, n); }

// The exact-k ranking key: (w0, column) compared lexicographically, as one uint64.
FB_HD uint64_t rank_key(uint32_t w0, uint32_t column) {
  return (static_cast<uint64_t>(w0) << 32) | column;
}

}  // namespace philox
}  // namespace fastbound
