// The vectorised row loops of the CPU loss kernels (row_pass.h), compiled
// once per x86-64 level (FB_CPU_CLONES) on 8 lanes, and once more on 16 lanes
// for AVX-512 CPUs (FB_CPU_WIDE, chosen by wide_lanes()); and the ISA report
// (vectorize.h).
//
// Float accumulation (fp32 / bf16 / fp16 scores) runs on vector lanes with the
// vector exp (fastbound::exp_lanes); blocks of 256 scores whose exponents all
// lie in the normal range (the usual case) take exp_lanes_normal, which skips
// the range fix-ups and gives the same values; the last, shorter block too (a
// short row is one block). The 16-lane loops end with one 8-lane step where 8
// columns remain; the last < 8 columns take one 8-lane step on a zero-padded
// copy. Both widths add into 16-lane sums in the same order (ColumnSums), so they
// give the same sums and the same values, bit for bit.
// float64 keeps the scalar loop over libm's exp.
#include "row_pass.h"

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <type_traits>

#include "convert.h"
#include "fastbound/elementwise.h"
#include "vectorize.h"

namespace fastbound {
namespace cpu {
namespace {

// The range check's unit (a multiple of every lane width).
constexpr int64_t kBlock = 256;

#define FB_INLINE inline __attribute__((always_inline))

// Software prefetch distance. The loops spend ~20 vector instructions per 64-byte line (the
// exp), so the hardware prefetcher, which restarts at every 4 KiB page of the scores, does not
// keep DRAM ahead of them: on a 2-core Xeon VM a 1024 x 32769 absorbing DSE forward (scores
// beyond the cache) took 0.80 ns a bf16 score and 0.61 a float one with it alone, 0.26-0.29 and
// 0.44 with each block's lines requested 2 KiB ahead (the same loop on cached scores: 0.30 / 0.27).
constexpr int64_t kPrefetchBytes = 2048;

// Requests the lines of scores [lo, hi) shifted kPrefetchBytes ahead. Past the end of the
// slice too: the DCE reads a row in 8 KiB chunks, and the next chunk's first lines are the
// ones the hardware prefetcher misses. A prefetch never faults, whatever the address.
template <typename scalar_t>
FB_INLINE void prefetch_ahead(const scalar_t* s, int64_t lo, int64_t hi) {
  constexpr int64_t kAhead = kPrefetchBytes / sizeof(scalar_t), kLine = 64 / sizeof(scalar_t);
  for (int64_t k = lo + kAhead; k < hi + kAhead; k += kLine) __builtin_prefetch(s + k);
}

// The bits of |x| as int32: they order like the magnitudes and put inf and NaN
// above every finite value.
template <typename L>
FB_INLINE typename L::I abs_bits(typename L::F x) {
  return L::as_int(x) & 0x7FFFFFFF;
}

// Whether no lane of m (a running maximum of abs_bits) exceeds kExpNormalBound.
FB_INLINE bool all_normal(i32x8 m) {
  const i32x8 over = m > VecLanes::as_int(VecLanes::splat(kExpNormalBound));
  int32_t any = 0;
  for (int k = 0; k < kLanes; ++k) any |= over[k];
  return any == 0;
}
FB_INLINE bool all_normal(i32x16 m) {
  const i32x8 lo = __builtin_shufflevector(m, m, 0, 1, 2, 3, 4, 5, 6, 7);
  const i32x8 hi = __builtin_shufflevector(m, m, 8, 9, 10, 11, 12, 13, 14, 15);
  return all_normal(lo > hi ? lo : hi);
}

template <typename L, typename scalar_t>
FB_INLINE bool block_is_normal(const scalar_t* s, int64_t n, float shift) {
  typename L::I m{};
  for (int64_t k = 0; k < n; k += L::kWidth) {
    const typename L::I a = abs_bits<L>(load_lanes<L>(s + k) - shift);
    m = a > m ? a : m;
  }
  return all_normal(m);
}

// exp_lanes_normal's p 2^n. On 16 lanes one vscalefps (AVX-512F) scales p by the float n:
// exact for a normal result, as adding n to p's exponent bits is, in one instruction
// instead of three. Inline assembly because the templates here are compiled for the default
// target and only inlined into FB_CPU_WIDE functions, where an intrinsic would not inline.
template <typename L>
FB_INLINE typename L::F exp_normal(typename L::F x) {
  return exp_lanes_normal<L>(x);
}
#if FB_CPU_X86_WIDE
template <>
FB_INLINE f32x16 exp_normal<VecLanes16>(f32x16 x) {
  const ExpParts<VecLanes16> e = exp_parts<VecLanes16>(x);
  f32x16 y;
  asm("vscalefps %2, %1, %0" : "=v"(y) : "v"(e.p), "v"(e.k));
  return y;
}
#endif

// Stores 16 floats as bfloat16 by AVX512_BF16's vcvtneps2bf16 (native_bf16()): round to
// nearest even, as float_to_bf16_bits, in one instruction instead of seven. It treats a
// subnormal input as zero and keeps a NaN's sign and payload, so a vector holding either
// (one vfpclassps) takes float_to_bf16_bits: the same bits as every other path.
#if FB_CPU_X86_WIDE
template <bool kStream>
FB_INLINE void store_bf16_native(c10::BFloat16* p, f32x16 v) {
  uint16_t special;
  asm("vfpclassps $0xA1, %1, %0" : "=k"(special) : "v"(v));  // QNaN, subnormal, SNaN
  u16x16 h;
  if (__builtin_expect(special != 0, 0)) {
    h = narrow(float_to_bf16_bits(v));
  } else {
    asm("vcvtneps2bf16 %1, %0" : "=v"(h) : "v"(v));
  }
  if constexpr (kStream) {
    stream_packed<VecLanes16>(p, h);
  } else {
    std::memcpy(p, &h, sizeof h);
  }
}
#endif

// store_lanes (kStream: stream_lanes), by store_bf16_native where kNative asks for it.
template <typename L, bool kNative, bool kStream = false, typename out_t>
FB_INLINE void store_out(out_t* p, typename L::F v) {
#if FB_CPU_X86_WIDE
  if constexpr (kNative && L::kWidth == 2 * kLanes && std::is_same_v<out_t, c10::BFloat16>) {
    store_bf16_native<kStream>(p, v);
    return;
  }
#endif
  if constexpr (kStream) {
    stream_lanes<L>(p, v);
  } else {
    store_lanes<L>(p, v);
  }
}

// One row_pass over a row: its pointers and constants, and the vector steps (kNative: 16-lane
// bfloat16 stores by store_bf16_native).
template <bool kWrite, bool kScores, typename scalar_t, typename out_t, bool kNative = false>
struct ExpPass {
  const scalar_t* s;
  out_t* g;
  float shift, scale, offset;

  // The exp of the vector at i, with the full exp or (kNormal) the in-range one; the largest
  // abs_bits(s - shift) seen goes into m, the scores into v.
  template <typename L, bool kNormal>
  FB_INLINE typename L::F step(int64_t i, typename L::F& v, typename L::I& m) const {
    using F = typename L::F;
    v = load_lanes<L>(s + i);
    const F x = v - shift;
    const typename L::I a = abs_bits<L>(x);
    m = a > m ? a : m;
    const F e = kNormal ? exp_normal<L>(x) : exp_lanes<L>(x);
    if constexpr (kWrite) store_out<L, kNative>(g + i, scale * e + offset);
    return e;
  }

  // The vectors of [lo, hi) (lo a multiple of 16) into the sums. One vector, or two
  // independent 8-lane ones, per iteration: the exp's multiplies bound the loop.
  template <typename L, bool kNormal, typename Sums>
  FB_INLINE void steps(int64_t lo, int64_t hi, Sums& sum_exp, Sums& sum_score, typename L::I& m) const {
    typename L::F v;
    for (int64_t i = lo; i < hi; i += 2 * kLanes) {
      if constexpr (L::kWidth == 2 * kLanes) {
        sum_exp.add(step<L, kNormal>(i, v, m));
        if constexpr (kScores) sum_score.add(v);
      } else {
        sum_exp.add_lo(step<L, kNormal>(i, v, m));
        if constexpr (kScores) sum_score.add_lo(v);
        if (i + kLanes < hi) {
          sum_exp.add_hi(step<L, kNormal>(i + kLanes, v, m));
          if constexpr (kScores) sum_score.add_hi(v);
        }
      }
    }
  }

  // [lo, mid) on L's lanes and [mid, hi) on 8 into the sums; whether every exponent was in
  // the normal range.
  template <typename L, bool kNormal, typename Sums>
  FB_INLINE bool block(int64_t lo, int64_t mid, int64_t hi, Sums& sum_exp, Sums& sum_score) const {
    typename L::I m{};
    i32x8 m8{};
    steps<L, kNormal>(lo, mid, sum_exp, sum_score, m);
    steps<VecLanes, kNormal>(mid, hi, sum_exp, sum_score, m8);
    return all_normal(m) && all_normal(m8);
  }

  // The last count < 8 columns from i: one 8-lane step on a zero-padded copy, the padding
  // lanes left out of the sums and the store (a short row has one such tail per segment,
  // and up to seven scalar exps cost several vector ones).
  template <typename Sums>
  FB_INLINE void tail(int64_t i, int64_t count, Sums& sum_exp, Sums& sum_score) const {
    scalar_t in[kLanes] = {};
    std::memcpy(in, s + i, count * sizeof(scalar_t));
    const f32x8 v = load8(in);
    const i32x8 live = i32x8{0, 1, 2, 3, 4, 5, 6, 7} < static_cast<int32_t>(count);
    const f32x8 e = live ? exp_lanes<VecLanes>(v - shift) : VecLanes::splat(0.0f);
    const f32x8 vs = live ? v : VecLanes::splat(0.0f);
    if (i % (2 * kLanes) == 0) {
      sum_exp.add_lo(e);
      if constexpr (kScores) sum_score.add_lo(vs);
    } else {
      sum_exp.add_hi(e);
      if constexpr (kScores) sum_score.add_hi(vs);
    }
    if constexpr (kWrite) {
      out_t out[kLanes];
      store_lanes<VecLanes>(out, scale * e + offset);
      std::memcpy(g + i, out, count * sizeof(out_t));
    }
  }
};

template <typename L, bool kWrite, bool kScores, bool kNative = false, typename scalar_t, typename out_t>
FB_INLINE RowSums<float> row_pass_lanes(const scalar_t* s, out_t* g, int64_t n, float shift, float scale,
                                        float offset) {
  using Sums = ColumnSums<typename L::F>;
  const ExpPass<kWrite, kScores, scalar_t, out_t, kNative> pass{s, g, shift, scale, offset};
  Sums se, ss;
  // Blocks of kBlock columns on L's lanes, the last one shorter (a short row is one block)
  // and, on 16 lanes, ending in one 8-lane step where 8 columns remain: the 8-lane loop's
  // blocks, with the same sums in the same order.
  const int64_t n8 = n - n % kLanes, n_wide = n - n % L::kWidth;
  // In place, the gradient overwrites the scores: each block is checked first
  // (a second read from L1). Otherwise it takes the in-range exp, is checked
  // as it goes, and is computed again with the full exp when out of range
  // (rare: a score 87 away from the shift, inf or NaN).
  const bool check_first = kWrite && static_cast<const void*>(g) == static_cast<const void*>(s);
  for (int64_t i = 0; i < n8; i += kBlock) {
    const int64_t hi = std::min(i + kBlock, n8), mid = std::min(hi, n_wide);
    prefetch_ahead(s, i, hi);
    if (check_first) {
      if (block_is_normal<L>(s + i, mid - i, shift) && block_is_normal<VecLanes>(s + mid, hi - mid, shift)) {
        pass.template block<L, true>(i, mid, hi, se, ss);
      } else {
        pass.template block<L, false>(i, mid, hi, se, ss);
      }
      continue;
    }
    Sums block_se;
    if (pass.template block<L, true>(i, mid, hi, block_se, ss)) {
      se += block_se;
    } else {
      Sums again;
      pass.template block<L, false>(i, mid, hi, se, again);
    }
  }
  const int64_t i = n8;
  if (i < n) pass.tail(i, n - i, se, ss);
  return {lane_sum(se.folded()), lane_sum(ss.folded())};
}

// The largest score, NaN-blind; float accumulation.
template <typename L, typename scalar_t>
FB_INLINE float row_max_lanes(const scalar_t* s, int64_t n) {
  float m = -std::numeric_limits<float>::infinity();
  int64_t i = 0;
  if constexpr (L::kWidth == kLanes) {
    // Two vectors per step, so that the comparisons overlap.
    f32x8 m0 = VecLanes::splat(m), m1 = m0;
    for (; i + 2 * kLanes <= n; i += 2 * kLanes) {
      const f32x8 v0 = load8(s + i), v1 = load8(s + i + kLanes);
      m0 = v0 > m0 ? v0 : m0;  // NaN-blind: a NaN lane never replaces the maximum
      m1 = v1 > m1 ? v1 : m1;
    }
    m = lane_max(m1, lane_max(m0, m));
  } else {
    // One 16-lane vector holds the 8-lane loop's two (m0, m1): the same maximum.
    f32x16 m01 = VecLanes16::splat(m);
    for (; i + 2 * kLanes <= n; i += 2 * kLanes) {
      const f32x16 v = load_lanes<VecLanes16>(s + i);
      m01 = v > m01 ? v : m01;
    }
    m = lane_max(m01, m);
  }
  for (; i < n; ++i) {
    const float v = to_acc(s[i]);
    m = v > m ? v : m;
  }
  return m;
}

// g = factor * e, float accumulation. kStream (16-bit g): the whole 64-byte lines of g are
// written by non-temporal stores (`stream_lanes`; a line written in part that way costs the
// memory a read-modify-write), the elements before the first and after the last one by
// ordinary stores (the same rounding either way).
template <typename L, bool kStream = false, bool kNative = false, typename scalar_t>
FB_INLINE void row_rescale_lanes(const float* e, scalar_t* g, int64_t n, float factor) {
  int64_t i = 0;
  if constexpr (kStream) {
    constexpr int64_t kLine = 64 / sizeof(scalar_t);  // a multiple of L::kWidth
    const int64_t head = std::min<int64_t>(n, (64 - reinterpret_cast<uintptr_t>(g) % 64) % 64 / sizeof(scalar_t));
    const int64_t lines_end = head + (n - head) / kLine * kLine;
    for (; i < head; ++i) g[i] = from_acc<scalar_t>(factor * e[i]);
    for (; i < lines_end; i += L::kWidth) store_out<L, kNative, true>(g + i, factor * load_lanes<L>(e + i));
  }
  for (; i + L::kWidth <= n; i += L::kWidth) store_out<L, kNative>(g + i, factor * load_lanes<L>(e + i));
  if constexpr (L::kWidth > kLanes) {
    if (n - i >= kLanes) {
      store8(g + i, factor * load8(e + i));
      i += kLanes;
    }
  }
  for (; i < n; ++i) g[i] = from_acc<scalar_t>(factor * e[i]);
}

// g *= factor in place, float accumulation; the lines ahead requested as in row_pass (the
// stream's read and write of each line leave the hardware prefetcher behind, as the exp does).
template <typename L, bool kNative = false, typename scalar_t>
FB_INLINE void row_scale_inplace_lanes(scalar_t* g, int64_t n, float factor) {
  int64_t i = 0;
  for (; i + kBlock <= n; i += kBlock) {
    prefetch_ahead(g, i, i + kBlock);
    for (int64_t k = i; k < i + kBlock; k += L::kWidth) store_out<L, kNative>(g + k, load_lanes<L>(g + k) * factor);
  }
  for (; i + L::kWidth <= n; i += L::kWidth) store_out<L, kNative>(g + i, load_lanes<L>(g + i) * factor);
  for (; i < n; ++i) g[i] = from_acc<scalar_t>(to_acc(g[i]) * factor);
}

// The 16-lane instances, for x86-64-v4 only (wide_lanes()).
template <bool kWrite, bool kScores, bool kNative = false, typename scalar_t, typename out_t>
FB_CPU_WIDE RowSums<float> row_pass_wide(const scalar_t* s, out_t* g, int64_t n, float shift, float scale,
                                         float offset) {
  return row_pass_lanes<VecLanes16, kWrite, kScores, kNative>(s, g, n, shift, scale, offset);
}

template <typename scalar_t>
FB_CPU_WIDE float row_max_wide(const scalar_t* s, int64_t n) {
  return row_max_lanes<VecLanes16>(s, n);
}

template <bool kStream, typename scalar_t>
FB_CPU_WIDE void row_rescale_wide(const float* e, scalar_t* g, int64_t n, float factor) {
  if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
    if (native_bf16()) return row_rescale_lanes<VecLanes16, kStream, true>(e, g, n, factor);
  }
  row_rescale_lanes<VecLanes16, kStream>(e, g, n, factor);
}

template <typename scalar_t>
FB_CPU_WIDE void row_scale_inplace_wide(scalar_t* g, int64_t n, float factor) {
  if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
    if (native_bf16()) return row_scale_inplace_lanes<VecLanes16, true>(g, n, factor);
  }
  row_scale_inplace_lanes<VecLanes16>(g, n, factor);
}

#undef FB_INLINE

}  // namespace

template <bool kScores, typename scalar_t, typename acc_t, typename out_t>
FB_CPU_CLONES RowSums<acc_t> row_pass(const scalar_t* s, out_t* g, int64_t n, acc_t shift, acc_t scale,
                                      acc_t offset) {
  if constexpr (std::is_same_v<acc_t, float>) {
    if (wide_lanes()) {
      if constexpr (std::is_same_v<out_t, c10::BFloat16>) {
        if (g != nullptr && native_bf16()) return row_pass_wide<true, kScores, true>(s, g, n, shift, scale, offset);
      }
      return g == nullptr ? row_pass_wide<false, kScores>(s, g, n, shift, scale, offset)
                          : row_pass_wide<true, kScores>(s, g, n, shift, scale, offset);
    }
    return g == nullptr ? row_pass_lanes<VecLanes, false, kScores>(s, g, n, shift, scale, offset)
                        : row_pass_lanes<VecLanes, true, kScores>(s, g, n, shift, scale, offset);
  } else {
    acc_t sum_exp = 0, sum_score = 0;
    for (int64_t i = 0; i < n; ++i) {
      const acc_t v = to_acc(s[i]);
      const acc_t e = exp_acc(v - shift);
      sum_exp += e;
      if constexpr (kScores) sum_score += v;
      if (g != nullptr) g[i] = from_acc<out_t>(scale * e + offset);
    }
    return {sum_exp, sum_score};
  }
}

template <typename scalar_t, typename acc_t>
FB_CPU_CLONES acc_t row_max(const scalar_t* s, int64_t n) {
  if constexpr (std::is_same_v<acc_t, float>) {
    return wide_lanes() ? row_max_wide(s, n) : row_max_lanes<VecLanes>(s, n);
  } else {
    acc_t m = -std::numeric_limits<acc_t>::infinity();
    for (int64_t i = 0; i < n; ++i) {
      const acc_t v = to_acc(s[i]);
      m = v > m ? v : m;
    }
    return m;
  }
}

template <typename scalar_t, typename acc_t>
FB_CPU_CLONES void row_rescale(const acc_t* e, scalar_t* g, int64_t n, acc_t factor, bool stream) {
  if constexpr (sizeof(scalar_t) == 2) {
    if (stream) {
      if (wide_lanes()) {
        row_rescale_wide<true>(e, g, n, factor);
      } else {
        row_rescale_lanes<VecLanes, true>(e, g, n, factor);
      }
      stream_fence();
      return;
    }
  }
  if constexpr (std::is_same_v<acc_t, float>) {
    if (wide_lanes()) {
      row_rescale_wide<false>(e, g, n, factor);
    } else {
      row_rescale_lanes<VecLanes>(e, g, n, factor);
    }
  } else {
    for (int64_t i = 0; i < n; ++i) g[i] = from_acc<scalar_t>(factor * e[i]);
  }
}

template <typename scalar_t, typename acc_t>
FB_CPU_CLONES void row_scale_inplace(scalar_t* g, int64_t n, acc_t factor) {
  if constexpr (std::is_same_v<acc_t, float>) {
    if (wide_lanes()) {
      row_scale_inplace_wide(g, n, factor);
    } else {
      row_scale_inplace_lanes<VecLanes>(g, n, factor);
    }
  } else {
    for (int64_t i = 0; i < n; ++i) g[i] = from_acc<scalar_t>(to_acc(g[i]) * factor);
  }
}

#define FB_INSTANTIATE(scalar_t, acc_t)                                                                          \
  template RowSums<acc_t> row_pass<true, scalar_t, acc_t>(const scalar_t*, scalar_t*, int64_t, acc_t, acc_t,     \
                                                          acc_t);                                                \
  template RowSums<acc_t> row_pass<false, scalar_t, acc_t>(const scalar_t*, scalar_t*, int64_t, acc_t, acc_t,    \
                                                           acc_t);                                               \
  template acc_t row_max<scalar_t, acc_t>(const scalar_t*, int64_t);                                             \
  template void row_rescale<scalar_t, acc_t>(const acc_t*, scalar_t*, int64_t, acc_t, bool);                   \
  template void row_scale_inplace<scalar_t, acc_t>(scalar_t*, int64_t, acc_t);
FB_INSTANTIATE(float, float)
FB_INSTANTIATE(double, double)
FB_INSTANTIATE(c10::Half, float)
FB_INSTANTIATE(c10::BFloat16, float)
#undef FB_INSTANTIATE
// The DCE's exponentials of 16-bit scores, kept in float.
template RowSums<float> row_pass<false, c10::Half, float, float>(const c10::Half*, float*, int64_t, float, float,
                                                                 float);
template RowSums<float> row_pass<false, c10::BFloat16, float, float>(const c10::BFloat16*, float*, int64_t, float,
                                                                     float, float);

namespace {

enum class IsaLevel { kBaseline, kAvx2, kAvx512 };

// The CPU's x86-64 level, lowered to AVX2 by FASTBOUND_CPU_ISA=avx2 (vectorize.h).
IsaLevel detect_level() {
  IsaLevel level = IsaLevel::kBaseline;
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && defined(__linux__)
  if (__builtin_cpu_supports("x86-64-v4")) {
    level = IsaLevel::kAvx512;
  } else if (__builtin_cpu_supports("x86-64-v3")) {
    level = IsaLevel::kAvx2;
  }
#endif
  const char* forced = std::getenv("FASTBOUND_CPU_ISA");
  if (forced != nullptr && std::strcmp(forced, "avx2") == 0 && level == IsaLevel::kAvx512) level = IsaLevel::kAvx2;
  return level;
}

IsaLevel isa_level() {
  static const IsaLevel level = detect_level();
  return level;
}

bool detect_bf16() {
#if FB_CPU_X86_WIDE
  return __builtin_cpu_supports("avx512bf16");
#else
  return false;
#endif
}

}  // namespace

bool wide_lanes() { return isa_level() == IsaLevel::kAvx512; }

bool native_bf16() {
  static const bool native = wide_lanes() && detect_bf16();
  return native;
}

const char* isa_name() {
  switch (isa_level()) {
    case IsaLevel::kAvx512:
      return "avx512";
    case IsaLevel::kAvx2:
      return "avx2";
    case IsaLevel::kBaseline:
      break;
  }
  return "baseline";
}

}  // namespace cpu
}  // namespace fastbound
