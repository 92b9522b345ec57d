// Likelihood integration step, CUDA kernels; the twin of csrc/cpu/integrate.cpp.
//
// Kernel 1: one group of threads (a warp for rows of up to 1024 columns, else a
// block, as in the loss kernels) per work item, a chunk of rows of one
// sequence. Per row it runs the loss kernels' row functor
// (loss_row_kernels.cuh) without a gradient, so the ids are judged by the same
// rules (a bad id gives a NaN loss), and sums the chunk in float64.
// Kernel 2: one thread per accumulator row adds, in sequence order, S_b =
// weight_b * (sum of b's chunks) and S_b^2 of each sequence b that uses it, so
// sequences sharing a row never race and the result is deterministic.
// Torch-free; the binding is integrate_binding.cpp.
#include <cstdint>
#include <type_traits>

#include "fastbound/elementwise.h"
#include "fastbound/integrate.h"
#include "integrate.h"
#include "loss_row_kernels.cuh"
#include "loss_rows.cuh"

namespace fastbound {
namespace gpu {
namespace {

// A warp sums fewer scores per item than a block, so that small-V batches
// still spread over many warps.
constexpr int64_t kWarpItemScores = int64_t(1) << 11;

int64_t rows_per_item(int64_t length, int64_t n_cols) {
  return warp_per_row(n_cols) ? integrate_rows_per_chunk(length, n_cols, kWarpItemScores)
                              : integrate_rows_per_chunk(length, n_cols);
}

// The loss sum of work item `item` (a chunk of one sequence's rows), run by
// every thread of its group; rank 0 writes it to partial[item].
template <typename scalar_t, typename Group, typename RowFn>
FB_HD void integrate_item(const Group& group, const IntegrateBatch<scalar_t>& p, const RowFn& row_fn,
                          int64_t item, int64_t rows_per_chunk, int64_t n_chunks) {
  using acc_t = acc_type<scalar_t>;
  const int64_t b = item / n_chunks, lo = (item % n_chunks) * rows_per_chunk;
  const int64_t hi = lo + rows_per_chunk < p.length ? lo + rows_per_chunk : p.length;
  const acc_t sigma = static_cast<acc_t>(p.sigma[b]);
  double total = 0;
  for (int64_t i = lo; i < hi; ++i) {
    const int64_t pos = b * p.length + i;
    const LossRow<scalar_t> row{p.out + b * p.stride_b + i * p.stride_l, nullptr, p.n_cols, sigma,
                                p.x_t[pos], p.x0[pos], acc_t(1)};
    total += static_cast<double>(row_fn(group, row));
  }
  if (group.rank() == 0) p.partial[item] = total;
}

// Accumulator update of the j-th sequence in slot order: the first sequence of
// each accumulator row adds every sequence of that row, in sequence order.
template <typename scalar_t>
FB_HD void integrate_finish(const IntegrateBatch<scalar_t>& p, int64_t j, int64_t n_chunks) {
  auto slot_at = [&](int64_t k) { return p.slot != nullptr ? p.slot[k] : k; };
  const int64_t slot = slot_at(j);
  if ((j > 0 && slot_at(j - 1) == slot) || slot < 0 || slot >= p.n_slots) return;
  double sum = p.acc[2 * slot], sum_sq = p.acc[2 * slot + 1];
  for (int64_t k = j; k < p.n_seq && slot_at(k) == slot; ++k) {
    const int64_t b = p.order != nullptr ? p.order[k] : k;
    double loss = 0;
    for (int64_t c = 0; c < n_chunks; ++c) loss += p.partial[b * n_chunks + c];
    const double value = p.weight[b] * loss;
    sum += value;
    sum_sq += value * value;
  }
  p.acc[2 * slot] = sum;
  p.acc[2 * slot + 1] = sum_sq;
}

template <typename scalar_t, typename Group, typename RowFn>
__global__ void __launch_bounds__(kMaxThreads)
    integrate_items_kernel(IntegrateBatch<scalar_t> p, RowFn row_fn, int64_t rows_per_chunk, int64_t n_chunks) {
  const Group group{};
  const int64_t n_items = p.n_seq * n_chunks;
  for (int64_t item = group.first_item(); item < n_items; item += group.items_per_grid()) {
    integrate_item(group, p, row_fn, item, rows_per_chunk, n_chunks);
  }
}

constexpr int kFinishThreads = 256;

template <typename scalar_t>
__global__ void __launch_bounds__(kFinishThreads) integrate_finish_kernel(IntegrateBatch<scalar_t> p, int64_t n_chunks) {
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  for (int64_t j = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; j < p.n_seq; j += stride) {
    integrate_finish(p, j, n_chunks);
  }
}

}  // namespace

int64_t integrate_workspace_doubles(int64_t n_seq, int64_t length, int64_t n_cols) {
  return n_seq * integrate_chunks(length, rows_per_item(length, n_cols));
}

template <typename scalar_t>
cudaError_t launch_integrate(const IntegrateBatch<scalar_t>& p, const LossSpec& spec, cudaStream_t stream) {
  if (p.n_seq == 0) return cudaSuccess;
  const int64_t rows_per_chunk = rows_per_item(p.length, p.n_cols);
  const int64_t n_chunks = integrate_chunks(p.length, rows_per_chunk);
  const cudaError_t status = visit_row_fn(spec, [&](const auto& row_fn) {
    using RowFn = std::decay_t<decltype(row_fn)>;
    return launch_groups(p.n_seq * n_chunks, p.n_cols, [&](auto group, unsigned grid, int threads) {
      integrate_items_kernel<scalar_t, decltype(group), RowFn>
          <<<grid, threads, 0, stream>>>(p, row_fn, rows_per_chunk, n_chunks);
    });
  });
  if (status != cudaSuccess) return status;
  const int64_t blocks = (p.n_seq + kFinishThreads - 1) / kFinishThreads;
  integrate_finish_kernel<scalar_t>
      <<<static_cast<unsigned>(blocks < kMaxBlocks ? blocks : kMaxBlocks), kFinishThreads, 0, stream>>>(p, n_chunks);
  return cudaGetLastError();
}

#define FB_INSTANTIATE(scalar_t) template cudaError_t launch_integrate<scalar_t>(const IntegrateBatch<scalar_t>&, const LossSpec&, cudaStream_t);
FB_FOR_EACH_CUDA_FLOAT(FB_INSTANTIATE)
#undef FB_INSTANTIATE

}  // namespace gpu
}  // namespace fastbound
