// `continuous_loss` on the CPU: `fastbound.continuous.denoising_loss`'s common eager call in
// one op, with its backward as a C++ autograd function (fastbound/continuous/loss.py takes
// this path for eager CPU calls whose checks an earlier call of the same signature passed, with
// no forward-mode AD; a weight that requires grad too). It flattens eps_hat (and eps) to
// (B, d) rows, runs continuous_denoising_loss and the reduction; `loss.backward()` never
// enters Python. At image sizes (256 x 3x32x32) the Python autograd.Function's apply and
// backward around the kernel cost about as much as the kernel itself. `continuous_integrate`
// is integrate_step's such call (fastbound/continuous/integrate.py): the weight and baseline
// value checks, the kernel and acc's version bump, for the Python layer's 10 us.
//
// The backward is chain_rows.h's, as fused_loss_autograd.cpp's.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/util/Exception.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <optional>
#include <tuple>

#include "chain_rows.h"

namespace fastbound {
namespace cpu {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// The arguments besides eps_hat and the row scale, none of them differentiated (a struct:
// autograd sees no inputs in it).
struct Args {
  std::optional<at::Tensor> eps;
  int64_t seed, offset;
};

// (B, ...) as contiguous (B, d) rows (`fastbound.continuous._args.rows`).
at::Tensor rows(const at::Tensor& t) {
  const int64_t b = t.size(0);
  const int64_t d = b > 0 ? t.numel() / b : c10::multiply_integers(t.sizes().slice(1));
  at::Tensor flat = t.dim() == 2 ? t : t.reshape({b, d});
  return flat.is_contiguous() ? flat : flat.contiguous();
}

std::optional<at::Tensor> optional_rows(const std::optional<at::Tensor>& t) {
  return t.has_value() ? std::optional<at::Tensor>(rows(*t)) : std::nullopt;
}

// The CPU kernel through the dispatcher (called below the Autograd key).
std::tuple<at::Tensor, at::Tensor> run_kernel(const at::Tensor& eps_hat, const at::Tensor& scale, const Args& args,
                                              bool need_grad) {
  static const auto op = c10::Dispatcher::singleton().findSchemaOrThrow("fastbound::continuous_denoising_loss", "")
      .typed<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const std::optional<at::Tensor>&,
                                                const at::Tensor&, int64_t, int64_t, bool)>();
  return op.call(rows(eps_hat), optional_rows(args.eps), scale, args.seed, args.offset, need_grad);
}

// The loss with d loss_b / d scale_b = loss_b / scale_b (`fastbound._ops.FusedLoss`'s rule):
// the kernel runs with scale 1 in the rows whose scale is 0, then their loss and gradient rows
// are set to zero, so the quotient is the unscaled loss in every row. Returns (loss, grad,
// unscaled loss).
std::tuple<at::Tensor, at::Tensor, at::Tensor> run_scaled(const at::Tensor& eps_hat, const at::Tensor& scale,
                                                          const Args& args, bool need_grad) {
  const at::Tensor zero = scale == 0;
  const bool any_zero = zero.any().item<bool>();
  const at::Tensor used = any_zero ? at::where(zero, at::ones_like(scale), scale) : scale;
  auto [loss, grad] = run_kernel(eps_hat, used, args, need_grad);
  const at::Tensor unscaled = loss / used;
  if (any_zero) {
    loss.masked_fill_(zero, 0);
    if (need_grad) grad.index_fill_(0, zero.nonzero().squeeze(1), 0);  // only the zero rows are written
  }
  return {loss, grad, unscaled};
}

// For "mean" the 1/B is in the scale; the mean of no sample is NaN, as torch's (and the oracle's).
at::Tensor reduce(const at::Tensor& loss, int64_t reduction) {
  if (reduction == kReduceNone) return loss;
  return reduction == kReduceMean && loss.size(0) == 0 ? loss.mean() : loss.sum();
}

// Differentiable in eps_hat and in the row scale (a learned weight; the Python layer forms the
// scale from it in torch ops, so autograd carries the gradient on to the weight).
struct ContinuousLossFunction : public torch::autograd::Function<ContinuousLossFunction> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& eps_hat, const at::Tensor& scale,
                            const Args& args, int64_t reduction) {
    at::AutoDispatchBelowADInplaceOrView guard;  // the output is no view of anything autograd knows
    const bool need_grad = eps_hat.requires_grad(), need_scale = scale.requires_grad();
    at::Tensor loss, grad, unscaled;
    if (need_scale) {
      std::tie(loss, grad, unscaled) = run_scaled(eps_hat, scale, args, need_grad);
    } else {
      std::tie(loss, grad) = run_kernel(eps_hat, scale, args, need_grad);
    }
    ctx->save_for_backward({grad, unscaled});
    ctx->saved_data["sizes"] = eps_hat.sizes().vec();
    ctx->saved_data["handed_out"] = false;
    ctx->set_materialize_grads(false);
    return reduce(loss, reduction);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const at::Tensor& upstream = grads[0];
    if (!upstream.defined()) return {at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
    TORCH_CHECK(!at::GradMode::is_enabled(), kOnce);
    const auto saved = ctx->get_saved_variables();
    at::Tensor d_eps_hat, d_scale;
    if (ctx->needs_input_grad(0)) {  // every row may be nonzero
      d_eps_hat = chain_rows(ctx, upstream, saved[0]).view(ctx->saved_data["sizes"].toIntVector());
    }
    if (ctx->needs_input_grad(1)) d_scale = upstream * saved[1];  // a sum's or mean's 0-dim upstream broadcasts
    return {d_eps_hat, d_scale, at::Tensor(), at::Tensor()};
  }
};

// The Autograd kernel: a graph node when eps_hat or the scale requires grad, else the kernel alone.
at::Tensor continuous_loss_autograd(const at::Tensor& eps_hat, const std::optional<at::Tensor>& eps,
                                    const at::Tensor& scale, int64_t seed, int64_t offset, int64_t reduction) {
  const Args args{eps, seed, offset};
  if (!(at::GradMode::is_enabled() && (eps_hat.requires_grad() || scale.requires_grad()))) {
    at::AutoDispatchBelowADInplaceOrView guard;
    return reduce(std::get<0>(run_kernel(eps_hat, scale, args, false)), reduction);
  }
  return ContinuousLossFunction::apply(eps_hat, scale, args, reduction);
}

// The CPU kernel, reached below the Autograd key (inference mode): no gradient.
at::Tensor continuous_loss_cpu(const at::Tensor& eps_hat, const std::optional<at::Tensor>& eps,
                               const at::Tensor& scale, int64_t seed, int64_t offset, int64_t reduction) {
  at::AutoDispatchBelowADInplaceOrView guard;
  return reduce(std::get<0>(run_kernel(eps_hat, scale, Args{eps, seed, offset}, false)), reduction);
}

// A weight or baseline tensor's value check on the host (`fastbound.continuous._args.check_finite`).
void check_finite(const at::Tensor& t, const char* name) {
  const double* p = t.const_data_ptr<double>();
  for (int64_t i = 0; i < t.numel(); ++i) {
    TORCH_CHECK_VALUE(std::isfinite(p[i]), name, " must be finite everywhere (it holds NaN or infinity)");
  }
}

// The (B,) float64 rows of a checked tensor, or of a float for every sample.
at::Tensor per_row(const std::optional<at::Tensor>& t, double value, int64_t n, const char* name) {
  if (!t.has_value()) return at::full({n}, value, at::TensorOptions().dtype(at::kDouble));
  check_finite(*t, name);
  return *t;
}

// integrate_step's checked call: the value checks, continuous_integrate_step, acc's version bump
// (a custom op's write below autograd does not bump it). Registered for CPU and AutogradCPU alike:
// it records nothing for autograd (eps_hat may require grad).
void continuous_integrate(const at::Tensor& eps_hat, const std::optional<at::Tensor>& eps, at::Tensor& acc,
                          const std::optional<at::Tensor>& weight, double weight_value,
                          const std::optional<at::Tensor>& baseline, double baseline_value, int64_t seed,
                          int64_t offset) {
  static const auto op = c10::Dispatcher::singleton().findSchemaOrThrow("fastbound::continuous_integrate_step", "")
      .typed<void(const at::Tensor&, const std::optional<at::Tensor>&, at::Tensor&, const at::Tensor&,
                  const std::optional<at::Tensor>&, const std::optional<at::Tensor>&, int64_t, int64_t)>();
  const int64_t n = eps_hat.size(0);
  const at::Tensor w = per_row(weight, weight_value, n, "weight");
  // No baseline is a baseline of 0 (S - 0.0 is S, also for -0.0 and NaN).
  const std::optional<at::Tensor> c = baseline.has_value() || baseline_value != 0.0
                                          ? std::optional<at::Tensor>(per_row(baseline, baseline_value, n, "baseline"))
                                          : std::nullopt;
  {
    at::AutoDispatchBelowADInplaceOrView guard;
    op.call(rows(eps_hat), optional_rows(eps), acc, w, c, std::nullopt, seed, offset);
  }
  acc.unsafeGetTensorImpl()->bump_version();
}

}  // namespace

TORCH_LIBRARY_IMPL(fastbound, AutogradCPU, m) {
  m.impl("continuous_loss", continuous_loss_autograd);
  m.impl("continuous_integrate", continuous_integrate);
}

TORCH_LIBRARY_IMPL(fastbound, CPU, m) {
  m.impl("continuous_loss", continuous_loss_cpu);
  m.impl("continuous_integrate", continuous_integrate);
}

}  // namespace cpu
}  // namespace fastbound
