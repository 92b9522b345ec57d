// FB_HD: the qualifiers of a function that runs on the host and, under nvcc,
// on the device too (always inlined). The one definition every header of
// csrc/include/fastbound and csrc/cuda uses.
#pragma once

#if defined(__CUDACC__)
#define FB_HD __host__ __device__ __forceinline__
#else
#define FB_HD inline __attribute__((always_inline))
#endif
