// Host launchers of the noise CUDA kernels (csrc/cuda/perturb.cu).
//
// Torch-free: raw device pointers, sizes and a stream. Included by perturb.cu
// and by the torch binding (csrc/cuda/perturb_binding.cpp), which a host C++
// compiler builds, so nothing here may need nvcc. The random numbers follow
// the contract of csrc/include/fastbound/philox.h, bit for bit like the CPU
// and Triton kernels.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace fastbound {
namespace gpu {

// The integer dtype of x0 and x_t.
enum class IdType : int { kInt64, kInt32, kInt16, kInt8, kUInt8 };

struct PerturbLaunch {
  const void* x0;  // (rows, cols) contiguous ids of `id_type`, in [0, vocab_size)
  void* x_t;       // (rows, cols) contiguous, same dtype
  bool* mask;      // (rows, cols) contiguous
  IdType id_type;
  int64_t rows, cols;
  // Bernoulli mode (threshold != nullptr): element (r, c) is selected iff
  // (w0 >> 8) < threshold[r * threshold_row_stride + c * threshold_col_stride].
  const int32_t* threshold;
  int64_t threshold_row_stride, threshold_col_stride;
  // Exact-k mode (num_masked != nullptr): row r selects the num_masked[r]
  // maskable elements with the smallest (w0, column) keys.
  const int64_t* num_masked;
  const bool* maskable;  // (rows, cols) contiguous, or nullptr: every element may be selected
  uint32_t vocab_size;   // uniform replacements: floor(w1 * vocab_size / 2^32)
  int64_t mask_id;       // absorbing replacement
  bool uniform;          // graph: uniform (else absorbing)
  uint64_t seed, offset;
};

// Writes x_t and mask on `stream`; returns the launch's error code.
cudaError_t launch_perturb(const PerturbLaunch& args, cudaStream_t stream);

// out[i, j] = word j of Philox4x32-10(counter[i, 0..3] mod 2^32, key (lo, hi) of seed);
// counter and out are (n, 4) contiguous int64.
cudaError_t launch_philox4x32(const int64_t* counter, int64_t* out, int64_t n, uint64_t seed, cudaStream_t stream);

}  // namespace gpu
}  // namespace fastbound
