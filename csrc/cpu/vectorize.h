// Helpers for the CPU kernels' inner loops.
//
// The row loops are plain C++ that GCC/Clang auto-vectorise. `FB_CPU_CLONES`
// compiles a function once per x86-64 micro-architecture level (AVX-512,
// AVX2+FMA, baseline SSE2) and picks the best at load time (GNU ifunc), so one
// wheel runs everywhere and still uses the widest vectors the CPU has.
// `fastbound::cpu::isa_name()` reports which level the loader picks.
#pragma once

#include <cstdint>

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
