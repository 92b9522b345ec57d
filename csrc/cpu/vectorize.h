// Helpers for the CPU kernels' inner loops.
//
// The row loops are written on GCC vector types (`f32x8`: eight floats), which
// the compiler lowers to the vector instructions of the target: one AVX2
// register, or two SSE2 ones. `FB_CPU_CLONES` compiles a function once per
// x86-64 micro-architecture level (AVX-512, AVX2+FMA, baseline SSE2) and picks
// the best at load time (GNU ifunc), so one wheel runs everywhere and still
// uses FMA where the CPU has it. (Plain loops over the scalar exp do not
// vectorise: GCC 12 keeps its range checks as branches.)
//
// On an AVX-512 CPU the discrete losses' row loops (row_pass.cpp) run on
// 16-lane vectors (`f32x16`, one zmm register) instead: a second instance of
// each loop on the `VecLanes16` policy, compiled for x86-64-v4 only
// (`FB_CPU_WIDE`), chosen once per call by `wide_lanes()`. Both widths give the
// same value in every element and the same sums (ColumnSums). On AVX2 and
// baseline CPUs nothing changes: the 8-lane clones run as before.
//
// (Zen 5, 4 x 512 x 32769 scores: the bf16 losses and integration step take
// 1.2-1.8x less time than on 8 lanes, fp32 1.05-1.35x; 512-bit FMAs run at
// the 256-bit rate there, no lower clock.) Elsewhere FB_CPU_WIDE is empty and
// wide_lanes() false: the 16-lane instances compile but never run.
//
// `FASTBOUND_CPU_ISA=avx2` in the environment (read once, at the first use)
// makes an AVX-512 CPU run the 8-lane row loops (their x86-64-v4 clone: the
// AVX2 CPUs' code, in AVX-512 encodings), so that both paths can be compared
// on one machine (in the spirit of PyTorch's ATEN_CPU_CAPABILITY); any other
// value, or a level the CPU lacks, changes nothing. It governs every choice made
// by wide_lanes() (the row loops, the continuous loss's loops, the Philox words);
// the other FB_CPU_CLONES kernels keep the loader's pick.
// `fastbound::cpu::isa_name()` reports the level the row loops run at.
#pragma once

#include <cstdint>
#include <cstring>

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && defined(__linux__)
#define FB_CPU_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#define FB_CPU_WIDE __attribute__((target("arch=x86-64-v4")))
#define FB_CPU_X86_WIDE 1
#else
#define FB_CPU_CLONES
#define FB_CPU_WIDE
#define FB_CPU_X86_WIDE 0
#endif

namespace fastbound {
namespace cpu {

// The ISA level the row loops run at: "avx512" (x86-64-v4, 16 lanes), "avx2"
// (x86-64-v3) or "baseline"; below the CPU's own level only under
// FASTBOUND_CPU_ISA=avx2.
const char* isa_name();

// Whether the row loops take their 16-lane instance: an x86-64-v4 CPU, not
// lowered by FASTBOUND_CPU_ISA.
bool wide_lanes();

// Whether the 16-lane loops also convert floats to bfloat16 with AVX512_BF16's
// instruction (row_pass.cpp store_bf16_native; the same bits): wide_lanes() on
// a CPU that has it (Cooper Lake, Sapphire Rapids and later; Zen 4 and later).
bool native_bf16();

constexpr int64_t kLanes = 8;
typedef float f32x8 __attribute__((vector_size(32)));
typedef int32_t i32x8 __attribute__((vector_size(32)));
typedef uint32_t u32x8 __attribute__((vector_size(32)));
typedef uint16_t u16x8 __attribute__((vector_size(16)));
typedef float f32x16 __attribute__((vector_size(64)));
typedef int32_t i32x16 __attribute__((vector_size(64)));
typedef uint32_t u32x16 __attribute__((vector_size(64)));
typedef uint16_t u16x16 __attribute__((vector_size(32)));
typedef uint16_t u16x32 __attribute__((vector_size(64)));

// A lane-width policy: the float, int32, uint32 and uint16 vectors of one
// width, and the lane operations of fastbound::exp_lanes (elementwise.h).
template <typename F_, typename I_, typename U_, typename H_>
struct VecLanesOf {
  using F = F_;
  using I = I_;
  using U = U_;  // 16-bit patterns widened to 32-bit lanes (convert.h)
  using H = H_;  // the same patterns packed
  static constexpr int64_t kWidth = sizeof(F) / sizeof(float);
  static inline __attribute__((always_inline)) F splat(float c) { return F{} + c; }
  // A vector cast reinterprets the bits.
  static inline __attribute__((always_inline)) F as_float(I i) { return (F)i; }
  static inline __attribute__((always_inline)) I as_int(F x) { return (I)x; }
};
using VecLanes = VecLanesOf<f32x8, i32x8, u32x8, u16x8>;        // 256-bit: AVX2 and the default
using VecLanes16 = VecLanesOf<f32x16, i32x16, u32x16, u16x16>;  // 512-bit: FB_CPU_WIDE code only

inline __attribute__((always_inline)) f32x8 low_half(f32x16 v) {
  return __builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7);
}
inline __attribute__((always_inline)) f32x8 high_half(f32x16 v) {
  return __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15);
}

// Sums of the consecutive columns of a pass in 16 lanes: lane k takes the
// columns k mod 16 (counted from a multiple of 16), in column order, at either
// width, so that the 16-lane loops round exactly as the 8-lane ones. A 16-lane
// vector is one add; the 8-lane loops keep the halves apart (two independent
// chains); folded() is the same 8-lane sum either way.
template <typename F>
struct ColumnSums;

template <>
struct ColumnSums<f32x8> {
  f32x8 lo{}, hi{};
  inline __attribute__((always_inline)) void add_lo(f32x8 v) { lo += v; }
  inline __attribute__((always_inline)) void add_hi(f32x8 v) { hi += v; }
  inline __attribute__((always_inline)) void operator+=(const ColumnSums& o) {
    lo += o.lo;
    hi += o.hi;
  }
  inline __attribute__((always_inline)) f32x8 folded() const { return lo + hi; }
};

template <>
struct ColumnSums<f32x16> {
  f32x16 v{};
  inline __attribute__((always_inline)) void add(f32x16 x) { v += x; }
  // One 8-lane step (the end of a row): the other half adds -0, which leaves every value
  // as it is (+0 included), as the 8-lane loops' untouched half.
  inline __attribute__((always_inline)) void add_lo(f32x8 x) {
    const f32x8 z = -f32x8{};  // -0 in every lane
    v += __builtin_shufflevector(x, z, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  }
  inline __attribute__((always_inline)) void add_hi(f32x8 x) {
    const f32x8 z = -f32x8{};  // -0 in every lane
    v += __builtin_shufflevector(z, x, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  }
  inline __attribute__((always_inline)) void operator+=(const ColumnSums& o) { v += o.v; }
  inline __attribute__((always_inline)) f32x8 folded() const { return low_half(v) + high_half(v); }
};

// Sum of the lanes, in a fixed order.
inline __attribute__((always_inline)) float lane_sum(f32x8 v) {
  return ((v[0] + v[4]) + (v[1] + v[5])) + ((v[2] + v[6]) + (v[3] + v[7]));
}

// Largest lane, NaN-blind like the scalar `v > m ? v : m`.
inline __attribute__((always_inline)) float lane_max(f32x8 v, float m) {
  for (int k = 0; k < kLanes; ++k) m = v[k] > m ? v[k] : m;
  return m;
}

// The same over a 16-lane vector whose halves an 8-lane loop would have kept
// as two maxima, the low one taken first (which of +0 and -0 it keeps included).
inline __attribute__((always_inline)) float lane_max(f32x16 v, float m) {
  return lane_max(high_half(v), lane_max(low_half(v), m));
}

// Calls fn(lo, hi) for the column ranges [0, skip) and (skip, n); `skip`
// outside [0, n) means one range [0, n).
template <typename Fn>
inline void for_segments(int64_t n, int64_t skip, Fn&& fn) {
  if (skip < 0 || skip >= n) {
    fn(int64_t(0), n);
    return;
  }
  fn(int64_t(0), skip);
  fn(skip + 1, n);
}

}  // namespace cpu
}  // namespace fastbound
