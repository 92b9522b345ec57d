// Likelihood integration step, CUDA kernels (torch-free; see integrate.h).
//
// Kernel 1: one block per (sequence, chunk of its rows). Per row, the block reads
// the V scores once (coalesced, strided over threads) and reduces them: an
// online log-sum-exp for the DCE, the sums of e^s (and s) for the DSE. Thread 0
// turns the reductions into the row's loss with the formulas of
// `fastbound/elementwise.h` and accumulates the chunk's sum in float64.
// Kernel 2: one block adds the chunks of each sequence, weighs them and adds
// (S_b, S_b^2) to the accumulator, serially in sequence order so that
// sequences sharing an accumulator row never race and the result is
// deterministic. Ids out of range give a NaN loss instead of a read out of
// bounds (the Python layer rejects them before the launch).
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cmath>
#include <cstdint>

#include "fastbound/elementwise.h"
#include "fastbound/integrate.h"
#include "integrate.h"
#include "loss_rows.cuh"

namespace fastbound {
namespace cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;

// Element loads and the accumulation type are the loss kernels' (loss_rows.cuh).
using gpu::acc_type;
using gpu::to_acc;

template <typename acc_t>
__device__ __forceinline__ acc_t neg_inf() {
  return -static_cast<acc_t>(INFINITY);
}

// Block-wide sum / max; every thread gets the result. `scratch` holds kWarps values.
template <typename acc_t>
__device__ acc_t block_sum(acc_t v, acc_t* scratch) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  __syncthreads();
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  acc_t total = 0;
  for (int w = 0; w < kWarps; ++w) total += scratch[w];
  return total;
}

template <typename acc_t>
__device__ acc_t block_max(acc_t v, acc_t* scratch) {
  for (int o = 16; o > 0; o >>= 1) v = fmax(v, __shfl_xor_sync(0xffffffffu, v, o));
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  __syncthreads();
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  acc_t m = scratch[0];
  for (int w = 1; w < kWarps; ++w) m = fmax(m, scratch[w]);
  return m;
}

// log sum_{y < n, y != skip} e^{s_y}, by the whole block.
template <typename scalar_t, typename acc_t>
__device__ acc_t block_log_sum_exp(const scalar_t* s, int64_t n, int64_t skip, acc_t* scratch) {
  acc_t m = neg_inf<acc_t>(), sum = 0;
  for (int64_t y = threadIdx.x; y < n; y += kThreads) {
    if (y == skip) continue;
    const acc_t x = to_acc(s[y]);
    if (x > m) {
      sum = (m == neg_inf<acc_t>() ? acc_t(0) : sum * exp_acc(m - x)) + acc_t(1);
      m = x;
    } else if (x != neg_inf<acc_t>()) {
      sum += exp_acc(x - m);
    }
  }
  const acc_t m_row = block_max(m, scratch);
  const acc_t shift = m_row == neg_inf<acc_t>() ? acc_t(0) : m_row;
  const acc_t total = block_sum(m == neg_inf<acc_t>() ? acc_t(0) : sum * exp_acc(m - shift), scratch);
  return shift + log(total);
}

// (sum e^{s_y}, sum s_y) over y < n, y != skip, by the whole block.
template <typename scalar_t, typename acc_t>
__device__ void block_sums(const scalar_t* s, int64_t n, int64_t skip, acc_t* scratch, acc_t& sum_exp,
                           acc_t& sum_score) {
  acc_t e = 0, t = 0;
  for (int64_t y = threadIdx.x; y < n; y += kThreads) {
    if (y == skip) continue;
    const acc_t x = to_acc(s[y]);
    e += exp_acc(x);
    t += x;
  }
  sum_exp = block_sum(e, scratch);
  sum_score = block_sum(t, scratch);
}

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    integrate_chunks_kernel(IntegrateProblem p, int64_t rows_per_chunk, int64_t n_chunks) {
  using acc_t = acc_type<scalar_t>;
  __shared__ acc_t scratch[kWarps];
  const int64_t b = blockIdx.x / n_chunks, chunk = blockIdx.x % n_chunks;
  const int64_t lo = chunk * rows_per_chunk;
  const int64_t hi = lo + rows_per_chunk < p.length ? lo + rows_per_chunk : p.length;
  const int64_t v = p.n_cols;
  const acc_t sigma = static_cast<acc_t>(p.sigma[b]);
  const acc_t nan = static_cast<acc_t>(NAN);
  const scalar_t* base = static_cast<const scalar_t*>(p.out) + b * p.stride_b;
  double total = 0;
  for (int64_t i = lo; i < hi; ++i) {
    const int64_t xt = p.x_t[b * p.length + i], x0 = p.x0[b * p.length + i];
    const scalar_t* row = base + i * p.stride_l;
    acc_t loss = 0;
    if (p.loss == kLossDce) {
      if (x0 == p.ignore_index || xt != p.mask_id) continue;
      if (x0 < 0 || x0 >= v || x0 == p.mask_id) {
        loss = nan;
      } else {
        const acc_t lse = block_log_sum_exp<scalar_t, acc_t>(row, v, p.mask_id < v ? p.mask_id : -1, scratch);
        loss = lse - to_acc(row[x0]);
      }
    } else if (p.graph == kGraphAbsorb) {
      // The loss kernels' order: x_t is checked first, even on ignored rows.
      if (xt >= 0 && xt < v && (x0 == p.ignore_index || xt != v - 1)) continue;
      if (xt < 0 || xt >= v || x0 < 0 || x0 >= v - 1) {
        loss = nan;
      } else {
        acc_t sum_exp, sum_score;
        block_sums<scalar_t, acc_t>(row, v - 1, -1, scratch, sum_exp, sum_score);
        loss = AbsorbRow<acc_t>(sigma).loss(sum_exp, to_acc(row[x0]));
      }
    } else {
      if (xt >= 0 && xt < v && x0 == p.ignore_index) continue;
      if (x0 < 0 || x0 >= v || xt < 0 || xt >= v) {
        loss = nan;
      } else {
        acc_t sum_exp, sum_score;
        block_sums<scalar_t, acc_t>(row, v, xt, scratch, sum_exp, sum_score);
        loss = UniformRow<acc_t>(sigma, v, xt == x0).loss(sum_exp, sum_score, to_acc(row[x0]));
      }
    }
    total += static_cast<double>(loss);
  }
  if (threadIdx.x == 0) p.workspace[b * n_chunks + chunk] = total;
}

// One block: per-sequence sums in parallel, then the accumulator update in sequence order.
__global__ void __launch_bounds__(kThreads) integrate_finish_kernel(IntegrateProblem p, int64_t n_chunks) {
  double* partial = p.workspace;
  double* seq = p.workspace + p.n_seq * n_chunks;
  for (int64_t b = threadIdx.x; b < p.n_seq; b += kThreads) {
    double sum = 0;
    for (int64_t c = 0; c < n_chunks; ++c) sum += partial[b * n_chunks + c];
    seq[b] = p.weight[b] * sum;
  }
  __syncthreads();
  if (threadIdx.x != 0) return;
  for (int64_t b = 0; b < p.n_seq; ++b) {
    const int64_t slot = p.index ? p.index[b] : b;
    if (slot < 0 || slot >= p.n_slots) continue;
    p.acc[2 * slot] += seq[b];
    p.acc[2 * slot + 1] += seq[b] * seq[b];
  }
}

template <typename scalar_t>
cudaError_t launch(const IntegrateProblem& p, cudaStream_t stream) {
  const int64_t rows_per_chunk = integrate_rows_per_chunk(p.length, p.n_cols);
  const int64_t n_chunks = p.length == 0 ? 0 : (p.length + rows_per_chunk - 1) / rows_per_chunk;
  if (n_chunks > 0) {
    const auto blocks = static_cast<unsigned>(p.n_seq * n_chunks);  // <= 2^31 - 1 positions
    integrate_chunks_kernel<scalar_t><<<blocks, kThreads, 0, stream>>>(p, rows_per_chunk, n_chunks);
  }
  integrate_finish_kernel<<<1, kThreads, 0, stream>>>(p, n_chunks);
  return cudaGetLastError();
}

}  // namespace

int64_t integrate_workspace_doubles(int64_t n_seq, int64_t length, int64_t n_cols) {
  const int64_t rows_per_chunk = integrate_rows_per_chunk(length, n_cols);
  const int64_t n_chunks = length == 0 ? 0 : (length + rows_per_chunk - 1) / rows_per_chunk;
  return n_seq * n_chunks + n_seq;
}

cudaError_t integrate_step(const IntegrateProblem& problem, Dtype dtype, cudaStream_t stream) {
  if (problem.n_seq == 0) return cudaSuccess;
  switch (dtype) {
    case Dtype::kFloat32:
      return launch<float>(problem, stream);
    case Dtype::kFloat64:
      return launch<double>(problem, stream);
    case Dtype::kFloat16:
      return launch<__half>(problem, stream);
    case Dtype::kBFloat16:
      return launch<__nv_bfloat16>(problem, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace cuda
}  // namespace fastbound
