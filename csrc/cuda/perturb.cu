// Fused noise sampling x0 -> x_t (fastbound.perturb) and the raw Philox
// generator, CUDA kernels; the twin of csrc/cpu/perturb.cpp. Torch-free;
// launchers declared in perturb.h.
//
// Every element draws its words from its own Philox counter (the contract in
// csrc/include/fastbound/philox.h), so the result is independent of the launch
// shape and equals the CPU and Triton kernels' bit for bit.
//   * Bernoulli mode: one thread per element (grid-stride loop).
//   * Exact-k mode: one block per row. The k-th smallest selection word of the
//     row's maskable elements is built bit by bit (32 block-wide counts of the
//     words below a candidate; words are recomputed, never stored), then ties at
//     that value are broken by column with a block-wide ballot scan. No sort.
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

#include "fastbound/philox.h"
#include "perturb.h"

namespace fastbound {
namespace gpu {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr unsigned kFullWarp = 0xFFFFFFFFu;

template <typename id_t, bool kUniform>
__device__ __forceinline__ id_t replacement(uint32_t w1, const PerturbLaunch& a) {
  return kUniform ? static_cast<id_t>(philox::uniform_below(w1, a.vocab_size)) : static_cast<id_t>(a.mask_id);
}

template <typename id_t, bool kUniform>
__global__ void __launch_bounds__(kThreads) bernoulli_kernel(const PerturbLaunch a) {
  const id_t* x0 = static_cast<const id_t*>(a.x0);
  id_t* x_t = static_cast<id_t*>(a.x_t);
  const int64_t n = a.rows * a.cols;
  const bool per_position = a.threshold_row_stride != 0 || a.threshold_col_stride != 0;
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < n; i += int64_t{gridDim.x} * blockDim.x) {
    int64_t at = 0;
    if (per_position) {
      const int64_t row = i / a.cols;
      at = row * a.threshold_row_stride + (i - row * a.cols) * a.threshold_col_stride;
    }
    const philox::Words w = philox::element_words(a.seed, a.offset, static_cast<uint64_t>(i));
    const bool selected = philox::bernoulli(w.w0, static_cast<uint32_t>(a.threshold[at])) &&
                          (a.maskable == nullptr || a.maskable[i]);
    const id_t x = x0[i];
    x_t[i] = selected ? replacement<id_t, kUniform>(w.w1, a) : x;
    a.mask[i] = selected;
  }
}

// Sum over the block; every thread receives it. `scratch` holds kWarps entries.
__device__ int64_t block_sum(int64_t value, int64_t* scratch) {
  for (int delta = 16; delta > 0; delta >>= 1) value += __shfl_xor_sync(kFullWarp, value, delta);
  __syncthreads();  // the previous call's readers are done with scratch
  if (threadIdx.x % 32 == 0) scratch[threadIdx.x / 32] = value;
  __syncthreads();
  int64_t total = 0;
#pragma unroll
  for (int w = 0; w < kWarps; ++w) total += scratch[w];
  return total;
}

// For a predicate over the block's threads: how many lower threads hold it
// (`rank`) and how many hold it in all (returned). `scratch` holds kWarps entries.
__device__ int64_t block_count_before(bool flag, int64_t* rank, int64_t* scratch) {
  const unsigned ballot = __ballot_sync(kFullWarp, flag);
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  __syncthreads();
  if (lane == 0) scratch[warp] = __popc(ballot);
  __syncthreads();
  int64_t before = __popc(ballot & ((1u << lane) - 1u)), total = 0;
#pragma unroll
  for (int w = 0; w < kWarps; ++w) {
    before += w < warp ? scratch[w] : 0;
    total += scratch[w];
  }
  *rank = before;
  return total;
}

template <typename id_t, bool kUniform>
__global__ void __launch_bounds__(kThreads) exact_k_kernel(const PerturbLaunch a) {
  __shared__ int64_t scratch[kWarps];
  const int64_t row = blockIdx.x;
  const int64_t first = row * a.cols;
  const int64_t k = a.num_masked[row];
  const bool* maskable = a.maskable != nullptr ? a.maskable + first : nullptr;
  const id_t* x0 = static_cast<const id_t*>(a.x0) + first;
  id_t* x_t = static_cast<id_t*>(a.x_t) + first;
  bool* mask = a.mask + first;

  // kth: the largest value with #{w0 < kth} < k, i.e. the k-th smallest word; below = #{w0 < kth}.
  uint64_t kth = 0;
  int64_t below = 0;
  for (int bit = 31; bit >= 0; --bit) {
    const uint64_t candidate = kth + (uint64_t{1} << bit);
    int64_t count = 0;
    for (int64_t col = threadIdx.x; col < a.cols; col += blockDim.x) {
      if (maskable == nullptr || maskable[col]) {
        count += philox::element_words(a.seed, a.offset, static_cast<uint64_t>(first + col)).w0 < candidate;
      }
    }
    count = block_sum(count, scratch);
    if (count < k) {
      kth = candidate;
      below = count;
    }
  }

  // Every word below kth, and the first (k - below) columns whose word equals kth.
  const int64_t ties_left = k - below;
  int64_t ties_seen = 0;
  for (int64_t base = 0; base < a.cols; base += blockDim.x) {
    const int64_t col = base + threadIdx.x;
    const bool in_row = col < a.cols;
    philox::Words w{0u, 0u, 0u, 0u};
    bool takes_part = false;
    if (in_row) {
      w = philox::element_words(a.seed, a.offset, static_cast<uint64_t>(first + col));
      takes_part = maskable == nullptr || maskable[col];
    }
    const bool tie = takes_part && w.w0 == kth;
    int64_t rank;
    const int64_t ties_here = block_count_before(tie, &rank, scratch);
    const bool selected = takes_part && (w.w0 < kth || (tie && ties_seen + rank < ties_left));
    ties_seen += ties_here;
    if (in_row) {
      const id_t x = x0[col];
      x_t[col] = selected ? replacement<id_t, kUniform>(w.w1, a) : x;
      mask[col] = selected;
    }
  }
}

template <typename id_t, bool kUniform>
void launch_typed(const PerturbLaunch& a, cudaStream_t stream) {
  if (a.threshold != nullptr) {
    const int64_t n = a.rows * a.cols;
    const int64_t blocks = std::min<int64_t>((n + kThreads - 1) / kThreads, int64_t{1} << 20);
    bernoulli_kernel<id_t, kUniform><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(a);
  } else {
    exact_k_kernel<id_t, kUniform><<<static_cast<unsigned>(a.rows), kThreads, 0, stream>>>(a);
  }
}

template <typename id_t>
void launch_graph(const PerturbLaunch& a, cudaStream_t stream) {
  if (a.uniform) {
    launch_typed<id_t, true>(a, stream);
  } else {
    launch_typed<id_t, false>(a, stream);
  }
}

__global__ void philox_kernel(const int64_t* counter, int64_t* out, int64_t n, uint64_t seed) {
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < n; i += int64_t{gridDim.x} * blockDim.x) {
    philox::counter_row_words(counter + 4 * i, out + 4 * i, seed);
  }
}

}  // namespace

cudaError_t launch_perturb(const PerturbLaunch& args, cudaStream_t stream) {
  if (args.rows == 0 || args.cols == 0) return cudaSuccess;
  switch (args.id_type) {
    case IdType::kInt64: launch_graph<int64_t>(args, stream); break;
    case IdType::kInt32: launch_graph<int32_t>(args, stream); break;
    case IdType::kInt16: launch_graph<int16_t>(args, stream); break;
    case IdType::kInt8: launch_graph<int8_t>(args, stream); break;
    case IdType::kUInt8: launch_graph<uint8_t>(args, stream); break;
    default: return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

cudaError_t launch_philox4x32(const int64_t* counter, int64_t* out, int64_t n, uint64_t seed, cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  const int64_t blocks = std::min<int64_t>((n + kThreads - 1) / kThreads, int64_t{1} << 20);
  philox_kernel<<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(counter, out, n, seed);
  return cudaGetLastError();
}

}  // namespace gpu
}  // namespace fastbound
