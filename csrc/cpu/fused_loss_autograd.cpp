// `fused_loss` on the CPU: the public losses' common call in one op, with its
// backward as a C++ autograd function (fastbound/losses.py takes this path for
// eager CPU calls whose only gradient is to the scores: no forward-mode AD, no
// gradient to sigma or weight, not in place). One call flattens the ids, builds
// the per-row scale (weight, 1/count for reduction="mean") and sigma rows, runs
// the value checks (check_ids.h), the fused kernel (dse_forward / dce_forward)
// and the reduction; `loss.backward()` never enters Python. At small sizes
// (4x64 tokens, V = 5) the Python layer around the kernel, and a Python
// autograd.Function's apply and backward, cost several times the kernel.
//
// The backward is chain_rows.h's (`fastbound._ops.chain_rows`), its rescale skipping the
// rows the loss wrote as zeros; for a summed loss the forward may have folded a predicted
// power-of-two upstream into the gradient already (`FactorMemo`).
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/util/Exception.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <limits>
#include <map>
#include <mutex>
#include <optional>
#include <tuple>
#include <vector>

#include "chain_rows.h"
#include "check_ids.h"
#include "fastbound/elementwise.h"

namespace fastbound {
namespace cpu {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// The flattened per-row inputs of the loss ops (their contract: csrc/common/checks.h).
struct Rows {
  at::Tensor x_t, x0, sigma, scale;
  int64_t loss, graph, mask_id, ignore_index;
};

// ``t.to(dtype).contiguous()``, never returning ``t`` itself through `to` or `contiguous`
// (below autograd an op may not return its input: torch.library.opcheck's schema check).
at::Tensor contiguous_as(const at::Tensor& t, at::ScalarType dtype) {
  at::Tensor out = t.scalar_type() == dtype ? t : t.to(dtype);
  return out.is_contiguous() ? out : out.contiguous();
}

// (N,) contiguous int64; the ids themselves when they already are. Called above the
// ADInplaceOrView key, so a flattening view shares the ids' version counter: ids changed
// in place before the backward make it raise (they decide which rows it skips).
at::Tensor flat_ids(const at::Tensor& ids, int64_t n) {
  return contiguous_as(ids.dim() == 1 ? ids : ids.reshape({n}), at::kLong);
}

// dst[i] = src at the i-th index of `sizes` (row-major) under the broadcast `strides`.
template <typename src_t, typename acc_t>
void gather_rows(const src_t* src, acc_t* dst, int64_t n, const std::vector<int64_t>& sizes,
                 const std::vector<int64_t>& strides) {
  std::vector<int64_t> index(sizes.size(), 0);
  int64_t offset = 0;
  for (int64_t i = 0; i < n; ++i) {
    dst[i] = static_cast<acc_t>(src[offset]);
    for (int64_t d = static_cast<int64_t>(sizes.size()) - 1; d >= 0; --d) {  // the next index, odometer-wise
      if (++index[d] < sizes[d]) {
        offset += strides[d];
        break;
      }
      offset -= strides[d] * (sizes[d] - 1);
      index[d] = 0;
    }
  }
}

// `fastbound._validate.as_rows` of a tensor (the Python layer checked that it broadcasts to
// `shape`): (N,) of acc, in one strided pass (broadcast_to, reshape and a copy cost more than
// the kernel at small sizes).
at::Tensor as_rows(const at::Tensor& value, at::IntArrayRef shape, int64_t n, at::ScalarType acc) {
  if (value.scalar_type() == acc && value.numel() == n && value.is_contiguous()) return value.view({n});
  const std::vector<int64_t> sizes(shape.begin(), shape.end());
  std::vector<int64_t> strides(sizes.size(), 0);
  const int64_t lead = static_cast<int64_t>(sizes.size()) - value.dim();
  for (int64_t d = 0; d < value.dim(); ++d) {
    if (value.size(d) != 1) strides[lead + d] = value.stride(d);
  }
  at::Tensor rows = at::empty({n}, value.options().dtype(acc));
  AT_DISPATCH_ALL_TYPES_AND2(at::kHalf, at::kBFloat16, value.scalar_type(), "fastbound_as_rows", [&] {
    const scalar_t* src = value.const_data_ptr<scalar_t>();
    if (acc == at::kDouble) {
      gather_rows(src, rows.mutable_data_ptr<double>(), n, sizes, strides);
    } else {
      gather_rows(src, rows.mutable_data_ptr<float>(), n, sizes, strides);
    }
  });
  return rows;
}

// Fills sigma and scale of `rows` (ids already flat) and runs the value checks. A float
// sigma was checked in Python; a float weight is the row scale of every row.
void fill_rows(Rows& rows, const at::Tensor& score, const std::optional<at::Tensor>& sigma, double sigma_value,
               at::IntArrayRef shape, const std::optional<at::Tensor>& weight, double weight_value,
               int64_t reduction) {
  const int64_t n = rows.x_t.size(0);
  const auto acc = score.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const auto options = score.options().dtype(acc);
  rows.scale = weight.has_value() ? as_rows(*weight, shape, n, acc) : at::full({n}, weight_value, options);
  if (rows.loss == kLossDse) {
    rows.sigma = sigma.has_value() ? as_rows(*sigma, shape, n, acc) : at::full({n}, sigma_value, options);
  }
  if (reduction == kReduceMean) {
    const int64_t* x0 = rows.x0.const_data_ptr<int64_t>();
    int64_t count = 0;
    for (int64_t i = 0; i < n; ++i) count += x0[i] != rows.ignore_index;
    rows.scale = rows.scale.div(static_cast<double>(count > 0 ? count : 1));  // in acc, as the Python layer
  }
  const std::optional<at::Tensor> checked_sigma = sigma.has_value() ? std::optional<at::Tensor>(rows.sigma) : std::nullopt;
  check_loss_ids_cpu(rows.x_t, rows.x0, checked_sigma, score.size(-1), rows.loss, rows.graph, rows.mask_id,
                     rows.ignore_index);
}

// The fused kernel on the flattened scores, through the dispatcher (called below the
// Autograd key: the CPU kernel itself).
std::tuple<at::Tensor, at::Tensor> run_kernel(const at::Tensor& score, const Rows& rows, bool need_grad) {
  const int64_t n = rows.x_t.size(0), v = score.size(-1);
  at::Tensor flat = score.reshape({n, v});
  if (v > 1 && flat.stride(1) != 1) flat = flat.contiguous();
  if (rows.loss == kLossDse) {
    static const auto op = c10::Dispatcher::singleton().findSchemaOrThrow("fastbound::dse_forward", "").typed<
        std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                           const at::Tensor&, int64_t, int64_t, int64_t, bool)>();
    return op.call(flat, rows.sigma, rows.x_t, rows.x0, rows.scale, rows.graph, rows.mask_id, rows.ignore_index,
                   need_grad);
  }
  static const auto op = c10::Dispatcher::singleton().findSchemaOrThrow("fastbound::dce_forward", "").typed<
      std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                         int64_t, int64_t, bool)>();
  return op.call(flat, rows.x_t, rows.x0, rows.scale, rows.mask_id, rows.ignore_index, need_grad);
}

at::Tensor reduce(const at::Tensor& loss, at::IntArrayRef shape, int64_t reduction) {
  return reduction == kReduceNone ? loss.view(shape) : loss.sum();
}

// The upstream factor the backward is expected to meet, per call signature of a summed loss:
// the forward folds it into the gradient's row scale, so a backward that meets it has nothing
// to rescale (`reduction="sum"` then `/ B`, a GradScaler's scale, gradient accumulation's
// `/ k`: the same factor every step). A factor is predicted once two backwards in a row met
// it, so two calls of one signature with different factors in a step (`(a + 0.5 * b)`) keep
// the prediction of none, and only powers of two 2^k are: scaling by 2^k is exact in every
// rounding, so the loss and the gradient are the same bits whatever the prediction (a miss
// rescales by upstream / 2^k, exact too), except for gradient values that are subnormal
// before or after the scaling (|g| or |g| 2^k below 2^-126), which may round differently, on
// a hit or a miss. A call the scaling could push out of float's range (`exactly_scaled`,
// `gradient_in_range`) runs unscaled, so the loss keeps its bits. fp16 gradients are never
// scaled (they overflow at 65504).
class FactorMemo {
 public:
  // (loss, graph, reduction, rows, columns, dtype)
  using Key = std::array<int64_t, 6>;

  static FactorMemo& get() {
    static FactorMemo* memo = new FactorMemo();  // leaked: backwards may run during exit
    return *memo;
  }

  static bool predicts(const at::Tensor& score, int64_t reduction) {
    const auto dtype = score.scalar_type();
    return reduction != kReduceNone && (dtype == at::kFloat || dtype == at::kDouble || dtype == at::kBFloat16);
  }

  int exponent(const Key& key) {
    std::lock_guard<std::mutex> lock(mutex_);
    const auto it = seen_.find(key);
    return it == seen_.end() ? 0 : it->second.predicted;
  }

  // After a backward: its upstream's exponent if it is a power of two, else 0.
  void observe(const Key& key, double upstream) {
    int k = 0;
    if (std::isfinite(upstream) && upstream > 0) {
      const int e = std::ilogb(upstream);
      if (std::ldexp(1.0, e) == upstream && std::abs(e) <= kMaxExponent) k = e;
    }
    std::lock_guard<std::mutex> lock(mutex_);
    if (seen_.size() >= kMaxKeys && !seen_.count(key)) seen_.clear();
    Seen& seen = seen_[key];
    seen.predicted = k == seen.last ? k : 0;
    seen.last = k;
  }

 private:
  static constexpr int kMaxExponent = 32;  // a GradScaler's scale starts at 2^16
  static constexpr size_t kMaxKeys = 256;
  struct Seen {
    int last = 0, predicted = 0;
  };
  std::mutex mutex_;
  std::map<Key, Seen> seen_;
};

// The normal range [tiny, huge] of the loss's and gradient's compute type: float, or double
// for float64 scores.
struct NormalRange {
  double tiny, huge;
};

NormalRange normal_range(at::ScalarType dtype) {
  if (dtype == at::kDouble) return {std::numeric_limits<double>::min(), std::numeric_limits<double>::max()};
  return {std::numeric_limits<float>::min(), std::numeric_limits<float>::max()};
}

// Whether each value of a loss computed with the row scale times 2^k is exactly 2^k times the
// unscaled one, and the gradient's values finite where the unscaled ones are: the scaled loss
// finite, at most a quarter of the float range, and zero or normal both scaled and unscaled
// (a subnormal lost bits, in the kernel or in the rescale by 2^-k).
bool exactly_scaled(const at::Tensor& loss, int k) {
  const NormalRange range = normal_range(loss.scalar_type());
  const at::Tensor a = loss.abs();
  return (a.le(range.huge / 4) & (a.ge(range.tiny * std::max(1.0, std::ldexp(1.0, k))) | a.eq(0))).all().item<bool>();
}

// Whether the score entropy's gradient stays finite under the row scale times 2^k (k > 0)
// wherever its loss is exactly scaled. A finite loss bounds the gradient unless its terms
// cancel: sum_y e^{s_y} against r s_{x0} - r (log r - 1) (absorbing; s_{x0} / a and the
// constant on the uniform graph), r = 1 / a = 1 / (e^sigma - 1), whose parts are at most
// r (2 * 88.8 + 1) for scores with a finite exp; so |scale| 2^k (1 + r) 2^9 <= 2^126 keeps
// every gradient value below the float range when the scaled loss is within a quarter of it.
// The DCE's gradient is at most |scale| 2^k, which the loss check bounds already.
bool gradient_in_range(const Rows& rows, int k) {
  if (rows.loss != kLossDse || k <= 0 || rows.scale.numel() == 0) return true;
  const at::Tensor r = rows.sigma.to(at::kDouble).expm1().reciprocal();
  const double bound = (rows.scale.to(at::kDouble).abs() * (r + 1)).max().item<double>();
  return bound <= std::ldexp(1.0, 126 - 9 - k);  // false for NaN
}

// The kernel with the gradient's rows scaled by 2^k: (the loss, unscaled; the gradient; the k
// used). A call the scaling would not keep exact runs with k = 0.
std::tuple<at::Tensor, at::Tensor, int> scaled_forward(const at::Tensor& score, Rows rows, int k) {
  if (k != 0 && gradient_in_range(rows, k)) {
    const at::Tensor unscaled = rows.scale;
    rows.scale = rows.scale.mul(std::ldexp(1.0, k));
    auto [loss, grad] = run_kernel(score, rows, /*need_grad=*/true);
    if (exactly_scaled(loss, k)) return {loss.mul_(std::ldexp(1.0, -k)), grad, k};
    rows.scale = unscaled;
  }
  auto [loss, grad] = run_kernel(score, rows, /*need_grad=*/true);
  return {loss, grad, 0};
}

struct FusedLossFunction : public torch::autograd::Function<FusedLossFunction> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& score, const Rows& rows, at::IntArrayRef shape,
                            int64_t reduction) {
    at::AutoDispatchBelowADInplaceOrView guard;  // the output is no view of anything autograd knows
    const bool predicts = FactorMemo::predicts(score, reduction);
    const FactorMemo::Key key{rows.loss, rows.graph, reduction, rows.x_t.size(0), score.size(-1),
                              static_cast<int64_t>(score.scalar_type())};
    auto [loss, grad, k] = scaled_forward(score, rows, predicts ? FactorMemo::get().exponent(key) : 0);
    // The rows the loss wrote as zeros, which the backward's rescale skips (`fastbound.losses.DseKernel`):
    // x0 == ignore_index, and x_t != mask_id except on the uniform graph. Inference tensors cannot be
    // saved: a copy is (it cannot change in place afterwards).
    const bool uniform = rows.loss == kLossDse && rows.graph == kGraphUniform;
    const auto savable = [](const at::Tensor& t) { return t.is_inference() ? t.clone() : t; };
    ctx->save_for_backward({grad, uniform ? at::Tensor() : savable(rows.x_t), savable(rows.x0)});
    ctx->saved_data["sizes"] = score.sizes().vec();
    ctx->saved_data["mask_id"] = uniform ? int64_t(-1) : rows.mask_id;
    ctx->saved_data["ignore_index"] = rows.ignore_index;
    ctx->saved_data["exponent"] = int64_t(k);
    ctx->saved_data["memo_key"] = predicts ? std::vector<int64_t>(key.begin(), key.end()) : std::vector<int64_t>{};
    ctx->saved_data["handed_out"] = false;
    ctx->set_materialize_grads(false);
    return reduce(loss, shape, reduction);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const at::Tensor& upstream = grads[0];
    if (!upstream.defined()) return {at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
    const std::vector<int64_t> memo_key = ctx->saved_data["memo_key"].toIntVector();
    const int64_t k = ctx->saved_data["exponent"].toInt();
    if (batched(upstream)) {
      // No value to read: neither observed by nor checked against the prediction. The saved
      // gradient is taken back to d loss / d score first (2^-k, exact, out of place), since
      // upstream 2^-k in the upstream's float type may leave its range; then the upstream is
      // applied out of place (`chain_rows`).
      const at::Tensor saved = ctx->get_saved_variables()[0];
      const at::Tensor grad = k == 0 ? saved : saved.mul(std::ldexp(1.0, static_cast<int>(-k)));
      const at::Tensor out = chain_rows(ctx, upstream, grad);
      return {out.view(ctx->saved_data["sizes"].toIntVector()), at::Tensor(), at::Tensor(), at::Tensor()};
    }
    // A summed loss's upstream is one value (on the host: this is the CPU op).
    const double u = memo_key.empty() && k == 0 ? 0.0 : upstream.item<double>();
    if (!memo_key.empty()) {
      FactorMemo::Key key;
      std::copy(memo_key.begin(), memo_key.end(), key.begin());
      FactorMemo::get().observe(key, u);
    }
    const variable_list saved = ctx->get_saved_variables();
    const ZeroRows zero{saved[1], saved[2], ctx->saved_data["mask_id"].toInt(), ctx->saved_data["ignore_index"].toInt()};
    // The forward's gradient is 2^k d loss / d score, so the factor left is upstream 2^-k: exact
    // when it is zero or a normal number of the gradient's float type, and the rescale then
    // rounds once, as the unpredicted path's. Otherwise the saved gradient is first taken back
    // to d loss / d score (a rescale by 2^-k, exact) and the upstream applied as it is.
    at::Tensor factor = upstream;
    if (k != 0) {
      const double unscale = std::ldexp(1.0, static_cast<int>(-k));
      const double f = std::abs(u * unscale);
      const NormalRange range = normal_range(saved[0].scalar_type());
      if (f == 0 || (f >= range.tiny && f <= range.huge)) {
        factor = upstream.mul(unscale);
      } else {
        rescale_rows(saved[0], unscale, zero);  // the buffer is still ours
        ctx->saved_data["exponent"] = int64_t(0);
      }
    }
    const at::Tensor out = chain_rows(ctx, factor, saved[0], zero);
    return {out.view(ctx->saved_data["sizes"].toIntVector()), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

Rows flat_rows(const at::Tensor& x_t, const at::Tensor& x0, int64_t loss, int64_t graph, int64_t mask_id,
               int64_t ignore_index) {
  const int64_t n = x_t.numel();
  return {flat_ids(x_t, n), flat_ids(x0, n), at::Tensor(), at::Tensor(), loss, graph, mask_id, ignore_index};
}

// The Autograd kernel: a graph node when the scores require grad, else the kernel alone.
at::Tensor fused_loss_autograd(const at::Tensor& score, const std::optional<at::Tensor>& sigma, double sigma_value,
                               const at::Tensor& x_t, const at::Tensor& x0, const std::optional<at::Tensor>& weight,
                               double weight_value, int64_t loss, int64_t graph, int64_t mask_id, int64_t ignore_index,
                               int64_t reduction) {
  Rows rows = flat_rows(x_t, x0, loss, graph, mask_id, ignore_index);
  const bool need_grad = at::GradMode::is_enabled() && score.requires_grad();
  {
    at::AutoDispatchBelowADInplaceOrView guard;
    fill_rows(rows, score, sigma, sigma_value, x_t.sizes(), weight, weight_value, reduction);
    if (!need_grad) return reduce(std::get<0>(run_kernel(score, rows, false)), x_t.sizes(), reduction);
  }
  return FusedLossFunction::apply(score, rows, x_t.sizes(), reduction);
}

// The CPU kernel, reached below the Autograd key (inference mode): no gradient.
at::Tensor fused_loss_cpu(const at::Tensor& score, const std::optional<at::Tensor>& sigma, double sigma_value,
                          const at::Tensor& x_t, const at::Tensor& x0, const std::optional<at::Tensor>& weight,
                          double weight_value, int64_t loss, int64_t graph, int64_t mask_id, int64_t ignore_index,
                          int64_t reduction) {
  at::AutoDispatchBelowADInplaceOrView guard;
  Rows rows = flat_rows(x_t, x0, loss, graph, mask_id, ignore_index);
  fill_rows(rows, score, sigma, sigma_value, x_t.sizes(), weight, weight_value, reduction);
  return reduce(std::get<0>(run_kernel(score, rows, false)), x_t.sizes(), reduction);
}

}  // namespace

TORCH_LIBRARY_IMPL(fastbound, AutogradCPU, m) { m.impl("fused_loss", fused_loss_autograd); }

TORCH_LIBRARY_IMPL(fastbound, CPU, m) { m.impl("fused_loss", fused_loss_cpu); }

}  // namespace cpu
}  // namespace fastbound
