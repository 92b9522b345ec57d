// Fused continuous noising (fastbound.continuous.perturb), CUDA kernel (twin of
// csrc/cpu/continuous_noise.cpp). Torch-free; launcher declared in continuous_noise.cuh.
//
// One thread per element (grid-stride), words from the element's own counter
// (continuous.h), so the result does not depend on the launch shape.
#include <cuda_runtime.h>

#include <cstdint>

#include "continuous_common.cuh"
#include "continuous_noise.cuh"
#include "fastbound/continuous.h"
#include "loss_rows.cuh"  // to_acc, from_acc, acc_type

namespace fastbound {
namespace gpu {
namespace continuous {
namespace {

namespace noise = ::fastbound::continuous;

int grid_for(int64_t n) {
  const int64_t blocks = (n + kThreads - 1) / kThreads;
  return static_cast<int>(blocks < 65535 * 32 ? blocks : 65535 * 32);
}

template <typename scalar_t, int kLaw>
__global__ void __launch_bounds__(kThreads) perturb_kernel(const PerturbArgs a) {
  using acc_t = acc_type<scalar_t>;
  const scalar_t* x = static_cast<const scalar_t*>(a.x);
  const acc_t* alpha = static_cast<const acc_t*>(a.alpha);
  const acc_t* sigma = static_cast<const acc_t*>(a.sigma);
  scalar_t* z = static_cast<scalar_t*>(a.z);
  scalar_t* eps = static_cast<scalar_t*>(a.eps);
  scalar_t* x_warm = static_cast<scalar_t*>(a.x_warm);
  const acc_t warm_std = static_cast<acc_t>(a.warm_std);
  const int64_t n = a.rows * a.cols;
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < n; i += int64_t{gridDim.x} * blockDim.x) {
    const int64_t row = i / a.cols;
    const philox::Words w = noise::element_words(a.seed, a.offset, static_cast<uint64_t>(i));
    const auto v = noise::noise<acc_t, kLaw>(w.w0, w.w1, w.w2);
    const acc_t xw = kLaw == noise::kWarmNone ? to_acc(x[i]) : to_acc(x[i]) + warm_std * v.warm;
    z[i] = from_acc<scalar_t>(alpha[row] * xw + sigma[row] * v.eps);
    eps[i] = from_acc<scalar_t>(v.eps);
    if (x_warm != nullptr) x_warm[i] = from_acc<scalar_t>(xw);
  }
}

}  // namespace

cudaError_t launch_perturb(const PerturbArgs& a, Dtype dtype, cudaStream_t stream) {
  if (a.rows * a.cols == 0) return cudaSuccess;
  return dispatch(dtype, [&](auto tag) {
    noise::with_law(a.law, [&](auto law) {
      perturb_kernel<decltype(tag), decltype(law)::value><<<grid_for(a.rows * a.cols), kThreads, 0, stream>>>(a);
    });
  });
}

}  // namespace continuous
}  // namespace gpu
}  // namespace fastbound
