// Helpers for the CPU kernels' inner loops.
//
// The row loops are written on GCC vector types (`f32x8`: eight floats), which
// the compiler lowers to the vector instructions of the target: one AVX2
// register, or two SSE2 ones. `FB_CPU_CLONES` compiles a function once per
// x86-64 micro-architecture level (AVX-512, AVX2+FMA, baseline SSE2) and picks
// the best at load time (GNU ifunc), so one wheel runs everywhere and still
// uses FMA where the CPU has it. `fastbound::cpu::isa_name()` reports which
// level the loader picks. (Plain loops over the scalar exp do not vectorise:
// GCC 12 keeps its range checks as branches.)
#pragma once

#include <cstdint>
#include <cstring>

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && defined(__linux__)
#define FB_CPU_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define FB_CPU_CLONES
#endif

namespace fastbound {
namespace cpu {

// The ISA level the FB_CPU_CLONES dispatcher selects on this machine:
// "avx512" (x86-64-v4), "avx2" (x86-64-v3) or "baseline".
const char* isa_name();

constexpr int64_t kLanes = 8;
typedef float f32x8 __attribute__((vector_size(32)));
typedef int32_t i32x8 __attribute__((vector_size(32)));
typedef uint32_t u32x8 __attribute__((vector_size(32)));
typedef uint16_t u16x8 __attribute__((vector_size(16)));

// The lane operations of fastbound::exp_lanes (elementwise.h) on f32x8.
struct VecLanes {
  using F = f32x8;
  using I = i32x8;
  static inline __attribute__((always_inline)) F splat(float c) { return F{} + c; }
  // A vector cast reinterprets the bits.
  static inline __attribute__((always_inline)) F as_float(I i) { return (F)i; }
  static inline __attribute__((always_inline)) I as_int(F x) { return (I)x; }
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
