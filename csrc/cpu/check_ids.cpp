// `check_loss_ids` on the CPU: the value checks of the public losses
// (fastbound/losses.py: `check_dse_ids`, `check_dce_ids`, and sigma > 0) in one
// pass over the ids, raising the same ValueError as the Python checks (the
// first bad id of x_t, then of x0, then a mask id in x0, then sigma), and of
// the integration step (fastbound/integrate.py; sigma per sequence). It
// replaces about a dozen small torch ops per call on CPU tensors; other devices
// keep the Python checks (one sync). `fused_loss` (fused_loss_autograd.cpp) calls
// it directly, without the dispatcher.
#include "check_ids.h"

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <cstdint>
#include <limits>
#include <optional>

#include "fastbound/elementwise.h"

namespace fastbound {
namespace cpu {
namespace {

// The first i with bad(ids[i]), or n.
template <typename Bad>
int64_t first_bad(const int64_t* ids, int64_t n, const Bad& bad) {
  for (int64_t i = 0; i < n; ++i) {
    if (bad(ids[i])) return i;
  }
  return n;
}

// sigma > 0 and finite everywhere (the DSE's per-row noise; NaN fails).
template <typename acc_t>
bool positive_finite(const acc_t* sigma, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    if (!(sigma[i] > acc_t(0) && sigma[i] <= std::numeric_limits<acc_t>::max())) return false;
  }
  return true;
}

}  // namespace

void check_loss_ids_cpu(const at::Tensor& x_t, const at::Tensor& x0, const std::optional<at::Tensor>& sigma,
                        int64_t n_cols, int64_t loss, int64_t graph, int64_t mask_id, int64_t ignore_index) {
  TORCH_CHECK_VALUE(x_t.dim() == 1 && x0.dim() == 1 && x_t.size(0) == x0.size(0) && x_t.is_contiguous() &&
                        x0.is_contiguous() && x_t.scalar_type() == at::kLong && x0.scalar_type() == at::kLong,
                    "fastbound.check_loss_ids: x_t and x0 must be contiguous (N,) int64");
  const int64_t n = x_t.size(0);
  const int64_t* xt = x_t.const_data_ptr<int64_t>();
  const int64_t* x0p = x0.const_data_ptr<int64_t>();
  // DCE: x_t may also be the mask id (which may lie past the logits); DSE: x_t in [0, V).
  const bool dce = loss == kLossDce;
  const int64_t bad_t =
      first_bad(xt, n, [&](int64_t id) { return !id_in_range(id, n_cols) && !(dce && id == mask_id); });
  TORCH_CHECK_VALUE(bad_t == n, "x_t contains id ", bad_t < n ? xt[bad_t] : 0, " outside [0, ", n_cols, ")");
  const int64_t bad_0 = first_bad(x0p, n, [&](int64_t id) { return !id_in_range(id, n_cols) && id != ignore_index; });
  TORCH_CHECK_VALUE(bad_0 == n, "x0 contains id ", bad_0 < n ? x0p[bad_0] : 0, " outside [0, ", n_cols, ")");
  const bool has_mask = loss == kLossDce || graph == kGraphAbsorb;
  // An ignored position is skipped even when ignore_index is the mask id, as the kernels skip it.
  TORCH_CHECK_VALUE(!has_mask || mask_id == ignore_index ||
                        first_bad(x0p, n, [&](int64_t id) { return id == mask_id; }) == n,
                    "x0 contains the mask id ", mask_id, "; clean tokens cannot be masked");
  if (!sigma.has_value()) return;
  // Per row (the losses) or per sequence (the integration step): any length.
  TORCH_CHECK_VALUE(sigma->dim() == 1 && sigma->is_contiguous() &&
                        (sigma->scalar_type() == at::kFloat || sigma->scalar_type() == at::kDouble),
                    "fastbound.check_loss_ids: sigma must be a contiguous 1-D float32 or float64 tensor");
  const int64_t n_sigma = sigma->size(0);
  const bool ok = sigma->scalar_type() == at::kFloat ? positive_finite(sigma->const_data_ptr<float>(), n_sigma)
                                                     : positive_finite(sigma->const_data_ptr<double>(), n_sigma);
  TORCH_CHECK_VALUE(ok, "sigma must be positive and finite everywhere");
}

TORCH_LIBRARY_IMPL(fastbound, CPU, m) { m.impl("check_loss_ids", check_loss_ids_cpu); }

}  // namespace cpu
}  // namespace fastbound
