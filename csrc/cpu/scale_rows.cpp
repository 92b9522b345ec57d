// `scale_rows_` on the CPU (contract: csrc/common/scale_rows.h): the backward of
// a fused loss multiplies the saved gradient's contributing rows by their
// upstream factor in place. One vectorised loop per row (row_pass.h's
// row_scale_inplace), rows in parallel; rows that are zero by construction or
// whose factor is 1 are not touched, so their pages are neither read nor written.
// Also the op's ADInplaceOrView kernel, for every device (common/inplace.h): it
// bumps grad's version, as every in-place write must.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <optional>

#include "common/inplace.h"
#include "common/scale_rows.h"
#include "row_pass.h"

namespace fastbound {
namespace cpu {
namespace {

void scale_rows_cpu(at::Tensor& grad, const at::Tensor& factor, const std::optional<at::Tensor>& x_t,
                    const std::optional<at::Tensor>& x0, int64_t mask_id, int64_t ignore_index) {
  check_scale_rows_inputs(grad, factor, x_t, x0);
  const int64_t n = grad.size(0), v = grad.size(1);
  if (n == 0 || v == 0) return;
  const int64_t* xt = x_t.has_value() && mask_id >= 0 ? x_t->const_data_ptr<int64_t>() : nullptr;
  const int64_t* x0p = x0.has_value() ? x0->const_data_ptr<int64_t>() : nullptr;
  const int64_t g_stride = grad.stride(0), f_stride = factor.stride(0);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(), "fastbound_scale_rows_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    scalar_t* g = grad.mutable_data_ptr<scalar_t>();
    const acc_t* f = factor.const_data_ptr<acc_t>();
    // About 64 KiB of gradient per task, as the loss kernels (loss_rows.h).
    const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 14) / v);
    at::parallel_for(0, n, grain, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        const acc_t fi = f[i * f_stride];
        // A zero row stays 0 only for a finite factor: 0 * inf and 0 * NaN are NaN, as autograd gives.
        const bool zero_row = std::isfinite(fi) &&
                              ((x0p != nullptr && x0p[i] == ignore_index) || (xt != nullptr && xt[i] != mask_id));
        if (fi != acc_t(1) && !zero_row) row_scale_inplace<scalar_t, acc_t>(g + i * g_stride, v, fi);
      }
    });
  });
}

// Runs the backend kernel below this key, then marks grad as modified in place.
void scale_rows_bump_version(c10::DispatchKeySet keys, at::Tensor& grad, const at::Tensor& factor,
                             const std::optional<at::Tensor>& x_t, const std::optional<at::Tensor>& x0,
                             int64_t mask_id, int64_t ignore_index) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("fastbound::scale_rows_", "")
                             .typed<void(at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
                                         const std::optional<at::Tensor>&, int64_t, int64_t)>();
  redispatch_and_bump(op, keys, grad, grad, factor, x_t, x0, mask_id, ignore_index);
}

}  // namespace

TORCH_LIBRARY_IMPL(fastbound, CPU, m) { m.impl("scale_rows_", scale_rows_cpu); }

TORCH_LIBRARY_IMPL(fastbound, ADInplaceOrView, m) {
  m.impl("scale_rows_", TORCH_FN(scale_rows_bump_version));
}

}  // namespace cpu
}  // namespace fastbound
