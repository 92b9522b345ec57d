// FB_HD: the qualifiers of a function that runs on the host and, under nvcc,
// on the device too (always inlined). The one definition every header of
// csrc/include/fastbound and csrc/cuda uses; and bit_cast, the one bit
// reinterpretation they share.
#pragma once

#include <cstring>

#if defined(__CUDACC__)
#define FB_HD __host__ __device__ __forceinline__
#else
#define FB_HD inline __attribute__((always_inline))
#endif

namespace fastbound {

// The bits of a value reinterpreted as another type of the same size.
template <typename To, typename From>
FB_HD To bit_cast(From from) {
  static_assert(sizeof(To) == sizeof(From), "bit_cast needs types of one size");
  To to;
  memcpy(&to, &from, sizeof to);
  return to;
}

}  // namespace fastbound
