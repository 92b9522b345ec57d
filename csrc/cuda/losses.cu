// The fused losses (DSE: SEDD's score entropy; DCE: MDLM's cross-entropy),
// CUDA kernels; the twin of csrc/cpu/losses.cpp. One group of threads per row
// runs the row's functor (loss_row_kernels.cuh: one streaming pass that reads
// every score once and writes the gradient in the same pass, the DCE with an
// online log-sum-exp first). Torch-free; the binding is losses_binding.cpp.
#include <type_traits>

#include "fastbound/elementwise.h"
#include "loss_row_kernels.cuh"
#include "loss_rows.cuh"
#include "losses.h"

namespace fastbound {
namespace gpu {
namespace {

// Row `i` of a batch, as the row functors take it.
template <typename scalar_t>
FB_HD LossRow<scalar_t> batch_row(const LossBatch<scalar_t>& b, int64_t i) {
  return {b.score + i * b.score_stride,
          b.grad != nullptr ? b.grad + i * b.grad_stride : nullptr,
          b.n_cols,
          b.sigma != nullptr ? b.sigma[i] : acc_type<scalar_t>(0),
          b.x_t[i],
          b.x0[i],
          b.row_scale[i]};
}

// One row of a loss kernel, run by every thread of its group: loss[i] = row_fn(row i).
template <typename scalar_t, typename Group, typename RowFn>
FB_HD void loss_row(const Group& group, const LossBatch<scalar_t>& batch, const RowFn& row_fn, int64_t i) {
  const acc_type<scalar_t> loss = row_fn(group, batch_row(batch, i));
  if (group.rank() == 0) batch.loss[i] = loss;
}

template <typename scalar_t, typename Group, typename RowFn>
__global__ void __launch_bounds__(kMaxThreads) loss_rows_kernel(LossBatch<scalar_t> batch, RowFn row_fn) {
  const Group group{};
  for (int64_t i = group.first_item(); i < batch.n_rows; i += group.items_per_grid()) {
    loss_row(group, batch, row_fn, i);
  }
}

}  // namespace

template <typename scalar_t>
cudaError_t launch_loss(const LossBatch<scalar_t>& batch, const LossSpec& spec, cudaStream_t stream) {
  return visit_row_fn(spec, [&](const auto& row_fn) {
    using RowFn = std::decay_t<decltype(row_fn)>;
    return launch_groups(batch.n_rows, batch.n_cols, [&](auto group, unsigned grid, int threads) {
      loss_rows_kernel<scalar_t, decltype(group), RowFn><<<grid, threads, 0, stream>>>(batch, row_fn);
    });
  });
}

#define FB_INSTANTIATE(scalar_t) template cudaError_t launch_loss<scalar_t>(const LossBatch<scalar_t>&, const LossSpec&, cudaStream_t);
FB_FOR_EACH_CUDA_FLOAT(FB_INSTANTIATE)
#undef FB_INSTANTIATE

}  // namespace gpu
}  // namespace fastbound
