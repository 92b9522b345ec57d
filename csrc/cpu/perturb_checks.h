// The contract checks of the `perturb` op, shared by the CPU kernel
// (csrc/cpu/perturb.cpp) and the CUDA binding (csrc/cuda/perturb_binding.cpp).
//
// `fastbound.noise.perturb` validates user input and always passes tensors that
// satisfy these; the checks guard direct calls of the raw op.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <optional>

#include "fastbound/elementwise.h"

namespace fastbound {

inline void check_perturb_inputs(const at::Tensor& x0, const std::optional<at::Tensor>& threshold,
                                 const std::optional<at::Tensor>& num_masked,
                                 const std::optional<at::Tensor>& maskable, int64_t vocab_size, int64_t graph) {
  TORCH_CHECK(x0.dim() == 2 && x0.is_contiguous(), "fastbound.perturb: x0 must be contiguous (B, L)");
  const int64_t rows = x0.size(0), cols = x0.size(1);
  TORCH_CHECK(threshold.has_value() != num_masked.has_value(),
              "fastbound.perturb: pass exactly one of threshold and num_masked");
  if (threshold.has_value()) {
    const at::Tensor& t = *threshold;
    TORCH_CHECK(t.dim() == 2 && t.scalar_type() == at::kInt && (t.size(0) == 1 || t.size(0) == rows) &&
                    (t.size(1) == 1 || t.size(1) == cols) && (t.size(1) == 1 || t.stride(1) == 1),
                "fastbound.perturb: threshold must be int32 of shape (B or 1, L or 1) with unit column stride");
  } else {
    const at::Tensor& k = *num_masked;
    TORCH_CHECK(k.dim() == 1 && k.size(0) == rows && k.scalar_type() == at::kLong && k.is_contiguous(),
                "fastbound.perturb: num_masked must be contiguous int64 (B,)");
  }
  if (maskable.has_value()) {
    TORCH_CHECK(maskable->sizes() == x0.sizes() && maskable->scalar_type() == at::kBool && maskable->is_contiguous(),
                "fastbound.perturb: maskable must be contiguous bool of x0's shape");
  }
  TORCH_CHECK(graph == kGraphAbsorb || graph == kGraphUniform, "fastbound.perturb: unknown graph code ", graph);
  TORCH_CHECK(vocab_size >= 1 && vocab_size <= INT64_C(0xFFFFFFFF),
              "fastbound.perturb: vocab_size must lie in [1, 2^32 - 1]");
  TORCH_CHECK(cols <= INT64_C(0xFFFFFFFF), "fastbound.perturb: rows longer than 2^32 - 1 are not supported");
  for (const auto* t : {&threshold, &num_masked, &maskable}) {
    TORCH_CHECK(!t->has_value() || (*t)->device() == x0.device(),
                "fastbound.perturb: every tensor must be on x0's device ", x0.device());
  }
}

}  // namespace fastbound
