// The continuous denoising loss and integration step, CUDA kernels (twin of
// csrc/cpu/continuous_loss.cpp). Torch-free; launchers declared in continuous_loss.cuh.
//
//   * one block per sample; each thread sums its strided
//     elements, then a fixed shuffle + shared-memory tree combines them (the
//     same order every run). The loss sums in the compute type and writes the
//     gradient in the same pass; the integration step sums in float64 into a
//     workspace, and one thread then adds (S_b, S_b^2) to the accumulator in
//     sample order (no atomics: deterministic even when samples share a slot).
#include <cuda_runtime.h>

#include <cstdint>

#include "continuous_common.cuh"
#include "continuous_loss.cuh"
#include "fastbound/continuous.h"
#include "loss_rows.cuh"  // to_acc, from_acc, acc_type

namespace fastbound {
namespace gpu {
namespace continuous {
namespace {

namespace noise = ::fastbound::continuous;

// Sum over the block, in a fixed order; thread 0 receives it.
template <typename sum_t>
__device__ sum_t block_sum(sum_t v) {
  __shared__ sum_t scratch[kThreads / 32];
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  if (threadIdx.x % 32 == 0) scratch[threadIdx.x / 32] = v;
  __syncthreads();
  sum_t total = 0;
  if (threadIdx.x == 0) {
    for (int w = 0; w < kThreads / 32; ++w) total += scratch[w];
  }
  return total;
}

// Sample b's sum of (eps - eps_hat)^2 in sum_t (valid in thread 0); writes
// grad = scale (eps_hat - eps) when grad is not null.
template <typename scalar_t, typename sum_t>
__device__ sum_t row_sum(const RowsArgs& a, int64_t b, acc_type<scalar_t> scale, scalar_t* grad) {
  using acc_t = acc_type<scalar_t>;
  const scalar_t* eh = static_cast<const scalar_t*>(a.eps_hat) + b * a.cols;
  const scalar_t* e = a.eps != nullptr ? static_cast<const scalar_t*>(a.eps) + b * a.cols : nullptr;
  sum_t sum = 0;
  for (int64_t j = threadIdx.x; j < a.cols; j += blockDim.x) {
    const int64_t i = b * a.cols + j;
    scalar_t target;
    if (e != nullptr) {
      target = e[j];
    } else {
      const philox::Words w = noise::element_words(a.seed, a.offset, static_cast<uint64_t>(i));
      target = from_acc<scalar_t>(noise::eps_only<acc_t>(w.w0, w.w1));
    }
    const sum_t diff = static_cast<sum_t>(to_acc(target)) - static_cast<sum_t>(to_acc(eh[j]));
    sum += diff * diff;
    if (grad != nullptr) grad[i] = from_acc<scalar_t>(-scale * static_cast<acc_t>(diff));
  }
  return block_sum(sum);
}

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads) loss_kernel(const RowsArgs a, const acc_type<scalar_t>* scale,
                                                        acc_type<scalar_t>* loss, scalar_t* grad) {
  using acc_t = acc_type<scalar_t>;
  const int64_t b = blockIdx.x;
  const acc_t s = scale[b];
  const acc_t sum = row_sum<scalar_t, acc_t>(a, b, s, grad);
  if (threadIdx.x == 0) loss[b] = acc_t(0.5) * s * sum;
}

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads) sums_kernel(const RowsArgs a, double* out) {
  const double sum = row_sum<scalar_t, double>(a, blockIdx.x, acc_type<scalar_t>(0), nullptr);
  if (threadIdx.x == 0) out[blockIdx.x] = sum;
}

__global__ void scatter_kernel(const double* sums, int64_t rows, const IntegrateArgs b) {
  for (int64_t r = 0; r < rows; ++r) {
    const double value = b.weight[r] * (sums[r] - (b.baseline != nullptr ? b.baseline[r] : 0.0));
    const int64_t slot = b.index != nullptr ? b.index[r] : r;
    if (slot < 0 || slot >= b.n_slots) continue;  // never write out of bounds
    b.acc[2 * slot] += value;
    b.acc[2 * slot + 1] += value * value;
  }
}

}  // namespace

cudaError_t launch_denoising_loss(const RowsArgs& a, const void* scale, void* loss, void* grad, Dtype dtype,
                                  cudaStream_t stream) {
  if (a.rows == 0) return cudaSuccess;
  return dispatch(dtype, [&](auto tag) {
    using scalar_t = decltype(tag);
    using acc_t = acc_type<scalar_t>;
    loss_kernel<scalar_t><<<static_cast<unsigned>(a.rows), kThreads, 0, stream>>>(
        a, static_cast<const acc_t*>(scale), static_cast<acc_t*>(loss), static_cast<scalar_t*>(grad));
  });
}

cudaError_t launch_integrate_step(const RowsArgs& a, const IntegrateArgs& b, Dtype dtype, cudaStream_t stream) {
  if (a.rows == 0) return cudaSuccess;
  const cudaError_t status = dispatch(dtype, [&](auto tag) {
    sums_kernel<decltype(tag)><<<static_cast<unsigned>(a.rows), kThreads, 0, stream>>>(a, b.workspace);
  });
  if (status != cudaSuccess) return status;
  scatter_kernel<<<1, 1, 0, stream>>>(b.workspace, a.rows, b);
  return cudaGetLastError();
}

}  // namespace continuous
}  // namespace gpu
}  // namespace fastbound
