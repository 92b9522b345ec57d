// The argument contracts of the raw ops, shared by the CPU kernels
// (csrc/cpu/*.cpp) and the CUDA bindings (csrc/cuda/*_binding.cpp).
//
// The Python layer (`fastbound/losses.py`, `integrate.py`, `noise.py`)
// validates user input and always passes tensors that satisfy these; the
// checks guard direct calls of the raw ops, so that a caller gets an error
// instead of an out-of-bounds access. Id values are the kernels' business
// (the CPU kernels raise, the CUDA kernels give NaN rows).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <initializer_list>
#include <optional>

#include "fastbound/elementwise.h"

namespace fastbound {

// Every tensor on the device of `first` (the scores, or x0 for perturb).
inline void check_same_device(const char* op, const at::Tensor& first,
                              std::initializer_list<const at::Tensor*> others) {
  for (const at::Tensor* t : others) {
    TORCH_CHECK(t->device() == first.device(), "fastbound.", op, ": every input must be on the device ",
                first.device(), " of its first tensor, got one on ", t->device());
  }
}

// The absorbing DSE's mask column: one of the V >= 2 columns (when there are rows).
inline void check_absorb_mask(int64_t n_rows, int64_t n_cols, int64_t mask_id) {
  TORCH_CHECK_VALUE(n_rows == 0 || (n_cols >= 2 && mask_id >= 0 && mask_id < n_cols),
                    "fastbound: the absorbing graph needs V >= 2 columns and mask_id in [0, V), got V = ", n_cols,
                    ", mask_id = ", mask_id);
}

// The flattened inputs of a loss op: scores (N, V), per-row ids, noise and scale.
struct LossInputs {
  const at::Tensor& score;
  const at::Tensor* sigma;  // (N,) total noise; nullptr for the DCE, which has none
  const at::Tensor& x_t;
  const at::Tensor& x0;
  const at::Tensor& row_scale;  // (N,) weight (and 1/count for "mean")
  LossSpec spec;
};

// `score` is (N, V) with unit column stride; the per-row tensors are
// contiguous (N,), floats of the accumulation dtype, ids int64.
// `inplace`: the gradient will overwrite `score`, so its rows must not share memory.
inline void check_loss_inputs(const LossInputs& in, bool inplace) {
  const at::Tensor& score = in.score;
  TORCH_CHECK(score.dim() == 2, "fastbound: score must be (N, V), got ", score.sizes());
  TORCH_CHECK(score.size(1) <= 1 || score.stride(1) == 1, "fastbound: score must have unit stride in its last dimension");
  const int64_t n = score.size(0), v = score.size(1);
  // With unit column stride the rows are disjoint iff the row stride is at
  // least V; at::assert_no_internal_overlap gives up ("too hard") on strides
  // below V from as_strided, which would race on a GPU.
  TORCH_CHECK(!inplace || n <= 1 || v == 0 || score.stride(0) >= v,
              "fastbound: the in-place op writes the gradient over score, whose rows overlap in memory (row stride ",
              score.stride(0), " < ", v, " columns: some elements refer to a single memory location); pass a tensor "
              "whose rows do not share memory");
  const auto acc = score.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  for (const at::Tensor* t : {in.sigma, &in.row_scale}) {
    TORCH_CHECK(t == nullptr || (t->dim() == 1 && t->size(0) == n && t->is_contiguous() && t->scalar_type() == acc),
                "fastbound: per-row float tensors must be contiguous (N,) of the accumulation dtype");
  }
  for (const at::Tensor* t : {&in.x_t, &in.x0}) {
    TORCH_CHECK(t->dim() == 1 && t->size(0) == n && t->is_contiguous() && t->scalar_type() == at::kLong,
                "fastbound: ids must be contiguous (N,) int64");
  }
  check_same_device("loss", score, {&in.x_t, &in.x0, &in.row_scale});
  if (in.sigma != nullptr) check_same_device("loss", score, {in.sigma});
  if (in.spec.loss == kLossDse) {
    TORCH_CHECK(in.spec.graph == kGraphAbsorb || in.spec.graph == kGraphUniform, "fastbound: unknown graph code ",
                in.spec.graph);
    if (in.spec.graph == kGraphAbsorb) check_absorb_mask(n, v, in.spec.mask_id);
  }
}

// The integration step (`integrate_step`): out (B, L, V) with unit stride in
// V, ids contiguous (B, L) int64, sigma and weight contiguous (B,) float64,
// acc contiguous (S, 2) float64, index contiguous (B,) int64 or absent (then S = B).
inline void check_integrate_inputs(const at::Tensor& out, const at::Tensor& x_t, const at::Tensor& x0,
                                   const at::Tensor& sigma, const at::Tensor& weight, const at::Tensor& acc,
                                   const std::optional<at::Tensor>& index, const LossSpec& spec) {
  TORCH_CHECK(out.dim() == 3, "fastbound: out must be (B, L, V), got ", out.sizes());
  TORCH_CHECK(out.size(2) <= 1 || out.stride(2) == 1, "fastbound: out must have unit stride in its last dimension");
  const int64_t b = out.size(0), l = out.size(1), v = out.size(2);
  for (const at::Tensor* t : {&x_t, &x0}) {
    TORCH_CHECK(t->dim() == 2 && t->size(0) == b && t->size(1) == l && t->is_contiguous() &&
                    t->scalar_type() == at::kLong,
                "fastbound: x_t and x0 must be contiguous (B, L) int64");
  }
  for (const at::Tensor* t : {&sigma, &weight}) {
    TORCH_CHECK(t->dim() == 1 && t->size(0) == b && t->is_contiguous() && t->scalar_type() == at::kDouble,
                "fastbound: sigma and weight must be contiguous (B,) float64");
  }
  TORCH_CHECK(acc.dim() == 2 && acc.size(1) == 2 && acc.is_contiguous() && acc.scalar_type() == at::kDouble,
              "fastbound: acc must be a contiguous (S, 2) float64 tensor");
  check_same_device("integrate_step", out, {&x_t, &x0, &sigma, &weight, &acc});
  if (index.has_value()) {
    TORCH_CHECK(index->dim() == 1 && index->size(0) == b && index->is_contiguous() &&
                    index->scalar_type() == at::kLong,
                "fastbound: index must be contiguous (B,) int64");
    check_same_device("integrate_step", out, {&*index});
  } else {
    TORCH_CHECK(acc.size(0) == b, "fastbound: without index, acc must have one row per sequence");
  }
  TORCH_CHECK(spec.loss == kLossDse || spec.loss == kLossDce, "fastbound: unknown loss code ", spec.loss);
  TORCH_CHECK(spec.loss == kLossDce || spec.graph == kGraphAbsorb || spec.graph == kGraphUniform,
              "fastbound: unknown graph code ", spec.graph);
  if (spec.loss == kLossDse && spec.graph == kGraphAbsorb) check_absorb_mask(b * l, v, spec.mask_id);
}

// The scalar arguments of the perturb ops, for rows of `cols` elements.
inline void check_perturb_scalars(int64_t cols, int64_t vocab_size, int64_t graph) {
  TORCH_CHECK(graph == kGraphAbsorb || graph == kGraphUniform, "fastbound.perturb: unknown graph code ", graph);
  TORCH_CHECK(vocab_size >= 1 && vocab_size <= INT64_C(0xFFFFFFFF),
              "fastbound.perturb: vocab_size must lie in [1, 2^32 - 1]");
  TORCH_CHECK(cols <= INT64_C(0xFFFFFFFF), "fastbound.perturb: rows longer than 2^32 - 1 are not supported");
}

// The `perturb` op.
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
  check_perturb_scalars(cols, vocab_size, graph);
  for (const auto* t : {&threshold, &num_masked, &maskable}) {
    TORCH_CHECK(!t->has_value() || (*t)->device() == x0.device(),
                "fastbound.perturb: every tensor must be on x0's device ", x0.device());
  }
}

}  // namespace fastbound
