// The backward of the C++ autograd functions of the fused losses (fused_loss_autograd.cpp,
// continuous_loss_autograd.cpp): `fastbound._ops.chain_rows` in C++. The forward saved the
// gradient of the per-row loss, already times the row scale; d out / d input is that
// gradient times the upstream per row. The first backward of a graph that is freed rescales
// the saved buffer in place with `scale_rows_` (not at all for the unit upstream of
// `loss.backward()` after a sum or mean) and hands it out; a retained graph gets a new tensor
// (the buffer is never shared or mutated), as does a batched upstream (`batched`); a double
// backward raises.
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/util/Exception.h>
#include <torch/autograd.h>
#include <torch/csrc/autograd/graph_task.h>

#include <cstdint>
#include <optional>

namespace fastbound {
namespace cpu {

constexpr int64_t kReduceNone = 0;  // reduction codes: fastbound/_names.py REDUCTIONS order
constexpr int64_t kReduceMean = 2;

constexpr const char* kOnce =
    "fastbound's fused losses are differentiable once: double backward (create_graph=True) is not supported; use "
    "fastbound.reference for higher derivatives";

// Whether every factor is exactly 1 (`fastbound._ops._unit`; a broadcast scalar: one read).
inline bool all_ones(const at::Tensor& factor) {
  const int64_t n = factor.size(0);
  bool ones = true;
  AT_DISPATCH_FLOATING_TYPES(factor.scalar_type(), "fastbound_all_ones", [&] {
    const auto f = factor.accessor<scalar_t, 1>();
    const int64_t m = factor.stride(0) == 0 ? (n > 0 ? 1 : 0) : n;
    for (int64_t i = 0; i < m && ones; ++i) ones = f[i] == scalar_t(1);
  });
  return ones;
}

// Whether the upstream is a vmap wrapper (`is_grads_batched=True` uses the legacy Batched key;
// vmap of a torch.func.vjp FuncTorchBatched): its values cannot be read, and the product has a
// batch dimension the saved buffer has not.
inline bool batched(const at::Tensor& upstream) {
  return upstream.key_set().has_any(
      c10::DispatchKeySet({c10::DispatchKey::Batched, c10::DispatchKey::FuncTorchBatched,
                           c10::DispatchKey::BatchedNestedTensor, c10::DispatchKey::FuncTorchGradWrapper}));
}

// The rows the loss wrote as zeros, which the rescale skips (csrc/common/scale_rows.h):
// undefined ids and mask_id -1 mark none.
struct ZeroRows {
  at::Tensor x_t, x0;
  int64_t mask_id = -1, ignore_index = 0;
};

// grad *= factor in place, every row but the zero ones (`fastbound::scale_rows_`).
inline void rescale_rows(at::Tensor grad, const at::Tensor& factor, const ZeroRows& zero) {
  static const auto op = c10::Dispatcher::singleton().findSchemaOrThrow("fastbound::scale_rows_", "").typed<
      void(at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&, const std::optional<at::Tensor>&, int64_t,
           int64_t)>();
  const auto opt = [](const at::Tensor& t) { return t.defined() ? std::optional<at::Tensor>(t) : std::nullopt; };
  op.call(grad, factor, opt(zero.x_t), opt(zero.x0), zero.mask_id, zero.ignore_index);
}

// The same with one factor for every row.
inline void rescale_rows(at::Tensor grad, double factor, const ZeroRows& zero) {
  const auto acc = grad.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  rescale_rows(grad, at::full({1}, factor, grad.options().dtype(acc)).expand({grad.size(0)}), zero);
}

// grad * upstream[:, None] for the saved buffer `grad` (N, V) (see the file comment); the
// forward sets ctx->saved_data["handed_out"] = false.
inline at::Tensor chain_rows(torch::autograd::AutogradContext* ctx, const at::Tensor& upstream, at::Tensor grad,
                             const ZeroRows& zero = {}) {
  TORCH_CHECK(!at::GradMode::is_enabled(), kOnce);
  const int64_t n = grad.size(0);
  const auto acc = grad.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor factor = upstream.dim() == 0 ? upstream.expand({n}) : upstream.reshape({n});
  if (factor.scalar_type() != acc) factor = factor.to(acc);
  // `fastbound._ops.may_hand_out`: once, and only by a backward that frees the graph.
  at::IValue& handed_out = ctx->saved_data["handed_out"];
  const bool first = !handed_out.toBool();
  handed_out = true;
  if (batched(upstream)) return grad * factor.unsqueeze(1);
  if (!first || torch::autograd::get_current_graph_task_keep_graph()) {
    return all_ones(factor) ? grad.clone() : grad * factor.unsqueeze(1);
  }
  // A sum's or mean's unit upstream (loss.backward()): one value to read, no rescale to call.
  if (upstream.dim() == 0 && upstream.item<double>() == 1.0) return grad;
  rescale_rows(grad, factor, zero);
  return grad;
}

}  // namespace cpu
}  // namespace fastbound
