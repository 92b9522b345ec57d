// What the CUDA torch bindings (losses_binding.cpp, integrate_binding.cpp)
// share: the torch -> CUDA element type mapping and the dtype dispatch over it.
// Built only against a CUDA torch.
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace fastbound {
namespace gpu {

// The CUDA element type with the same bits as a torch scalar type.
template <typename scalar_t>
struct CudaScalar {
  using type = scalar_t;
};
template <>
struct CudaScalar<c10::Half> {
  using type = __half;
};
template <>
struct CudaScalar<c10::BFloat16> {
  using type = __nv_bfloat16;
};
template <typename scalar_t>
using cuda_scalar_t = typename CudaScalar<scalar_t>::type;

static_assert(sizeof(c10::Half) == sizeof(__half), "c10::Half and __half must have the same layout");
static_assert(sizeof(c10::BFloat16) == sizeof(__nv_bfloat16),
              "c10::BFloat16 and __nv_bfloat16 must have the same layout");

// A tensor's data as the CUDA element type `cuda_t`.
template <typename cuda_t>
const cuda_t* cuda_data(const at::Tensor& t) {
  return reinterpret_cast<const cuda_t*>(t.const_data_ptr());
}
template <typename cuda_t>
cuda_t* cuda_mutable_data(at::Tensor& t) {
  return reinterpret_cast<cuda_t*>(t.mutable_data_ptr());
}

}  // namespace gpu
}  // namespace fastbound

// Runs the body with `cuda_t` the CUDA element type of a float32 / float64 /
// float16 / bfloat16 tensor type.
#define FB_DISPATCH_CUDA_FLOATS(type, name, ...)                                \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, type, name, [&] { \
    using cuda_t = ::fastbound::gpu::cuda_scalar_t<scalar_t>;                   \
    __VA_ARGS__();                                                              \
  })
