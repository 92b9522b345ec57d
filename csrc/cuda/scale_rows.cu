// `scale_rows_` on CUDA (declared in scale_rows.h), the twin of
// csrc/cpu/scale_rows.cpp. One block per row (grid-stride over the rows): every
// thread reads the row's factor and ids, so a skipped row (factor 1, or a row
// the loss wrote as zeros) costs one cached read of three values and no
// traffic over its V gradient entries. Torch-free; the binding is
// scale_rows_binding.cpp.
#include <algorithm>

#include "loss_rows.cuh"
#include "scale_rows.h"

namespace fastbound {
namespace gpu {
namespace {

constexpr int kScaleThreads = 256;
constexpr int64_t kMaxScaleBlocks = 65535;

template <typename scalar_t>
__global__ void __launch_bounds__(kScaleThreads) scale_rows_kernel(ScaleRowsBatch<scalar_t> b) {
  using acc_t = acc_type<scalar_t>;
  for (int64_t i = blockIdx.x; i < b.n_rows; i += gridDim.x) {
    const acc_t f = b.factor[i * b.factor_stride];
    // A zero row stays 0 only for a finite factor: 0 * inf and 0 * NaN are NaN, as autograd gives.
    const bool zero_row = isfinite(f) && ((b.x0 != nullptr && b.x0[i] == b.ignore_index) ||
                                          (b.x_t != nullptr && b.mask_id >= 0 && b.x_t[i] != b.mask_id));
    if (f == acc_t(1) || zero_row) continue;
    scalar_t* g = b.grad + i * b.grad_stride;
    for (int64_t j = threadIdx.x; j < b.n_cols; j += blockDim.x) g[j] = from_acc<scalar_t>(to_acc(g[j]) * f);
  }
}

}  // namespace

template <typename scalar_t>
cudaError_t launch_scale_rows(const ScaleRowsBatch<scalar_t>& batch, cudaStream_t stream) {
  if (batch.n_rows == 0 || batch.n_cols == 0) return cudaSuccess;
  const unsigned grid = static_cast<unsigned>(std::min<int64_t>(batch.n_rows, kMaxScaleBlocks));
  scale_rows_kernel<scalar_t><<<grid, kScaleThreads, 0, stream>>>(batch);
  return cudaGetLastError();
}

#define FB_INSTANTIATE(scalar_t) template cudaError_t launch_scale_rows<scalar_t>(const ScaleRowsBatch<scalar_t>&, cudaStream_t);
FB_FOR_EACH_CUDA_FLOAT(FB_INSTANTIATE)
#undef FB_INSTANTIATE

}  // namespace gpu
}  // namespace fastbound
