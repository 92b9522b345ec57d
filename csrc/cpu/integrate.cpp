// Likelihood integration step, CPU kernel; the twin of csrc/cuda/integrate.cu.
//
// For every sequence b of a batch of denoiser outputs (B, L, V):
//   S_b = weight_b * sum_i loss(out[b, i], sigma_b, x_t[b, i], x0[b, i])
//   acc[index_b, 0] += S_b,   acc[index_b, 1] += S_b^2
// with the loss computed by the same per-row functions as the fused losses
// (`loss_row_kernels.h`), no gradient and no per-token loss tensor. The rows
// of a sequence are split into fixed chunks whose partial sums are added in a
// fixed order, so the result does not depend on the number of threads.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Optional.h>
#include <torch/library.h>

#include <vector>

#include "common/checks.h"
#include "common/inplace.h"
#include "fastbound/elementwise.h"
#include "fastbound/integrate.h"
#include "loss_row_kernels.h"
#include "loss_rows.h"

namespace fastbound {
namespace cpu {
namespace {

// Sum of the per-row losses over each chunk of each sequence: partial[b * n_chunks + c].
template <typename scalar_t, typename RowFn>
void chunk_sums(const at::Tensor& out, const at::Tensor& x_t, const at::Tensor& x0, const at::Tensor& sigma,
                std::vector<double>& partial, int64_t rows_per_chunk, const RowFn& row_fn) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t l = out.size(1), v = out.size(2);
  const int64_t n_chunks = integrate_chunks(l, rows_per_chunk);
  const scalar_t* base = out.const_data_ptr<scalar_t>();
  const int64_t stride_b = out.stride(0), stride_l = out.stride(1);
  const int64_t* xt = x_t.const_data_ptr<int64_t>();
  const int64_t* x0p = x0.const_data_ptr<int64_t>();
  const double* sig = sigma.const_data_ptr<double>();
  at::parallel_for(0, static_cast<int64_t>(partial.size()), 1, [&](int64_t begin, int64_t end) {
    RowFn task_fn = row_fn;  // the task's own copy (its memo of per-sigma constants)
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / n_chunks, lo = (task % n_chunks) * rows_per_chunk;
      const int64_t hi = std::min(l, lo + rows_per_chunk);
      double sum = 0;
      for (int64_t i = lo; i < hi; ++i) {
        const int64_t pos = b * l + i;
        LossRow<scalar_t, acc_t> row{base + b * stride_b + i * stride_l, nullptr, v,
                                     static_cast<acc_t>(sig[b]), xt[pos], x0p[pos], acc_t(1)};
        sum += static_cast<double>(task_fn(row));
      }
      partial[task] = sum;
    }
  });
}

void integrate_step(const at::Tensor& out, const at::Tensor& x_t, const at::Tensor& x0,
                    const at::Tensor& sigma, const at::Tensor& weight, at::Tensor& acc,
                    const std::optional<at::Tensor>& index, int64_t loss, int64_t graph, int64_t mask_id,
                    int64_t ignore_index) {
  const LossSpec spec{loss, graph, mask_id, ignore_index};
  check_integrate_inputs(out, x_t, x0, sigma, weight, acc, index, spec);
  const int64_t b = out.size(0), l = out.size(1), v = out.size(2);
  const int64_t rows_per_chunk = integrate_rows_per_chunk(l, v);
  const int64_t n_chunks = integrate_chunks(l, rows_per_chunk);
  std::vector<double> partial(static_cast<size_t>(b * n_chunks), 0.0);
  if (!partial.empty()) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "integrate_step_cpu", [&] {
      visit_row_fn(spec, [&](const auto& row_fn) {
        chunk_sums<scalar_t>(out, x_t, x0, sigma, partial, rows_per_chunk, row_fn);
      });
    });
  }
  // Serial, in sequence order: several sequences may share an accumulator row.
  const double* w = weight.const_data_ptr<double>();
  const int64_t* idx = index.has_value() ? index->const_data_ptr<int64_t>() : nullptr;
  double* a = acc.mutable_data_ptr<double>();
  const int64_t n_slots = acc.size(0);
  for (int64_t s = 0; s < b; ++s) {
    const int64_t slot = idx ? idx[s] : s;
    check_id(slot, n_slots, "index");
    double sum = 0;
    for (int64_t c = 0; c < n_chunks; ++c) sum += partial[s * n_chunks + c];
    const double value = w[s] * sum;
    a[2 * slot] += value;
    a[2 * slot + 1] += value * value;
  }
}

// Runs the backend kernel below this key, then marks acc as modified in place (common/inplace.h).
void integrate_step_bump_version(c10::DispatchKeySet keys, const at::Tensor& out, const at::Tensor& x_t,
                                 const at::Tensor& x0, const at::Tensor& sigma, const at::Tensor& weight,
                                 at::Tensor& acc, const std::optional<at::Tensor>& index, int64_t loss, int64_t graph,
                                 int64_t mask_id, int64_t ignore_index) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("fastbound::integrate_step", "")
                             .typed<void(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                         const at::Tensor&, at::Tensor&, const std::optional<at::Tensor>&, int64_t,
                                         int64_t, int64_t, int64_t)>();
  redispatch_and_bump(op, keys, acc, out, x_t, x0, sigma, weight, acc, index, loss, graph, mask_id, ignore_index);
}

}  // namespace

TORCH_LIBRARY_IMPL(fastbound, CPU, m) { m.impl("integrate_step", &integrate_step); }

TORCH_LIBRARY_IMPL(fastbound, ADInplaceOrView, m) {
  m.impl("integrate_step", TORCH_FN(integrate_step_bump_version));
}

}  // namespace cpu
}  // namespace fastbound
