// The continuous denoising loss and integration step, CPU kernels.
//
// Both are one pass over eps_hat (and eps, or eps regenerated from its Philox
// counters, continuous.h) that sums (eps - eps_hat)^2 per sample:
//   continuous_denoising_loss:  loss_b = 0.5 scale_b sum_i (eps - eps_hat)^2 and, when
//     need_grad, grad = scale_b (eps_hat - eps) written in the same pass;
//   continuous_integrate_step:  S_b = weight_b (sum_i (eps - eps_hat)^2 - baseline_b),
//     acc[index_b] += (S_b, S_b^2), no gradient.
// A row is cut into fixed chunks, each summed in the compute type (float32, float64
// for float64 input) for the loss and in float64 for the integration step; the chunk
// sums are added in float64 in chunk order, and the accumulator rows are updated
// serially in sample order, so the results do not depend on the number of threads.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <algorithm>
#include <optional>
#include <tuple>
#include <type_traits>
#include <vector>

#include "continuous_lanes.h"
#include "continuous_words.h"
#include "convert.h"
#include "fastbound/continuous.h"
#include "common/continuous_checks.h"
#include "vectorize.h"

namespace fastbound {
namespace cpu {
namespace {

constexpr int64_t kChunk = 4096;  // elements per task; a multiple of kTile
constexpr int64_t kTile = 512;    // regenerated eps per tile, kept in L1
constexpr int64_t kMinPerThread = 16384;  // elements: below this, one thread (OpenMP start-up costs more)

// Sum of (e - eh)^2 over n elements in sum_t; writes g = scale (eh - e) when kGrad. The
// sum runs in kLanes interleaved partial sums (element i into lane i mod kLanes, added
// in lane order at the end): a fixed order that GCC vectorises (an `omp simd` reduction
// is left scalar in the target clones).
constexpr int64_t kLanes = 16;

template <bool kGrad, typename scalar_t, typename acc_t, typename sum_t>
FB_CPU_CLONES sum_t squared_error(const scalar_t* __restrict eh, const scalar_t* __restrict e, scalar_t* __restrict g,
                                  int64_t n, acc_t scale) {
  sum_t lanes[kLanes] = {};
  const int64_t whole = n - n % kLanes;
  for (int64_t i = 0; i < n; i += kLanes) {
    const int64_t m = i < whole ? kLanes : n - i;
    for (int64_t k = 0; k < m; ++k) {
      // Without a gradient the difference is formed in sum_t (exact in float64 for the
      // integration step); with one, in the compute type, as the gradient needs it.
      const sum_t diff = kGrad ? static_cast<sum_t>(to_acc(e[i + k]) - to_acc(eh[i + k]))
                               : static_cast<sum_t>(to_acc(e[i + k])) - static_cast<sum_t>(to_acc(eh[i + k]));
      lanes[k] += diff * diff;
      if (kGrad) g[i + k] = from_acc<scalar_t>(-scale * static_cast<acc_t>(diff));
    }
  }
  sum_t sum = 0;
  for (int64_t k = 0; k < kLanes; ++k) sum += lanes[k];
  return sum;
}

// eps of elements first .. first + n - 1, rounded to scalar_t as perturb returns it
// (through a float tile for 16-bit types: the conversion inline would keep the loop scalar).
template <typename acc_t>
FB_CPU_CLONES void eps_tile(const uint32_t* w0, const uint32_t* w1, int64_t n, acc_t* out) {
  continuous_lanes::eps_lanes(w0, w1, n, out);
}

template <typename scalar_t>
FB_CPU_CLONES void round_to(const float* in, scalar_t* out, int64_t n) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) out[j] = from_acc<scalar_t>(in[j]);
}

template <typename scalar_t>
void regenerate(uint64_t seed, uint64_t offset, uint64_t first, int64_t n, scalar_t* out) {
  using acc_t = at::opmath_type<scalar_t>;
  uint32_t w0[kTile], w1[kTile];
  continuous_tile_words(seed, offset, first, n, w0, w1, nullptr);
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    eps_tile(w0, w1, n, out);
  } else {
    acc_t wide[kTile];
    eps_tile(w0, w1, n, wide);
    round_to(wide, out, n);
  }
}

struct Regen {
  uint64_t seed, offset;
};

// Per-sample float64 sums of (eps - eps_hat)^2, chunks summed in sum_t; writes the
// gradient when grad is not null.
template <typename scalar_t, typename sum_t>
std::vector<double> row_sums(const at::Tensor& eps_hat, const std::optional<at::Tensor>& eps, const Regen& regen,
                             const at::opmath_type<scalar_t>* scale, scalar_t* grad) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t rows = eps_hat.size(0), cols = eps_hat.size(1);
  const int64_t n_chunks = (cols + kChunk - 1) / kChunk;
  std::vector<double> partial(static_cast<size_t>(rows * n_chunks), 0.0);
  const scalar_t* eh = eps_hat.const_data_ptr<scalar_t>();
  const scalar_t* e = eps.has_value() ? eps->const_data_ptr<scalar_t>() : nullptr;
  const int64_t grain = std::max<int64_t>(1, kMinPerThread / std::max<int64_t>(1, std::min(cols, kChunk)));
  at::parallel_for(0, rows * n_chunks, grain, [&](int64_t begin, int64_t end) {
    scalar_t buffer[kTile];
    for (int64_t task = begin; task < end; ++task) {
      const int64_t row = task / n_chunks, lo = (task % n_chunks) * kChunk;
      const int64_t hi = std::min(cols, lo + kChunk), first = row * cols;
      const acc_t s = scale != nullptr ? scale[row] : acc_t(0);
      double sum = 0;
      for (int64_t col = lo; col < hi; col += kTile) {
        const int64_t n = std::min(kTile, hi - col), at = first + col;
        const scalar_t* target = e != nullptr ? e + at : buffer;
        if (e == nullptr) regenerate(regen.seed, regen.offset, static_cast<uint64_t>(at), n, buffer);
        sum += static_cast<double>(grad != nullptr ? squared_error<true, scalar_t, acc_t, sum_t>(eh + at, target,
                                                                                                grad + at, n, s)
                                                   : squared_error<false, scalar_t, acc_t, sum_t>(eh + at, target,
                                                                                                 nullptr, n, s));
      }
      partial[task] = sum;
    }
  });
  std::vector<double> total(static_cast<size_t>(rows), 0.0);
  for (int64_t row = 0; row < rows; ++row) {
    for (int64_t c = 0; c < n_chunks; ++c) total[row] += partial[row * n_chunks + c];
  }
  return total;
}

std::tuple<at::Tensor, at::Tensor> continuous_denoising_loss(const at::Tensor& eps_hat,
                                                             const std::optional<at::Tensor>& eps,
                                                             const at::Tensor& scale, int64_t seed, int64_t offset,
                                                             bool need_grad) {
  continuous::check_eps("continuous_denoising_loss", eps_hat, eps);
  continuous::check_per_row("continuous_denoising_loss", eps_hat, scale, continuous::compute_type(eps_hat), "scale");
  at::Tensor loss = at::empty({eps_hat.size(0)}, scale.options());
  at::Tensor grad = need_grad ? at::empty_like(eps_hat) : at::empty({0}, eps_hat.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, eps_hat.scalar_type(), "continuous_loss_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const acc_t* s = scale.const_data_ptr<acc_t>();
    const std::vector<double> sums = row_sums<scalar_t, acc_t>(eps_hat, eps, Regen{static_cast<uint64_t>(seed),
                                                        static_cast<uint64_t>(offset)}, s,
                                                        need_grad ? grad.mutable_data_ptr<scalar_t>() : nullptr);
    acc_t* out = loss.mutable_data_ptr<acc_t>();
    for (size_t row = 0; row < sums.size(); ++row) out[row] = acc_t(0.5) * s[row] * static_cast<acc_t>(sums[row]);
  });
  return {loss, grad};
}

void continuous_integrate_step(const at::Tensor& eps_hat, const std::optional<at::Tensor>& eps, at::Tensor& acc,
                               const at::Tensor& weight, const std::optional<at::Tensor>& baseline,
                               const std::optional<at::Tensor>& index, int64_t seed, int64_t offset) {
  continuous::check_integrate(eps_hat, eps, acc, weight, baseline, index);
  std::vector<double> sums;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, eps_hat.scalar_type(), "continuous_integrate_cpu", [&] {
    sums = row_sums<scalar_t, double>(eps_hat, eps, Regen{static_cast<uint64_t>(seed), static_cast<uint64_t>(offset)},
                              nullptr, nullptr);
  });
  const double* w = weight.const_data_ptr<double>();
  const double* c = baseline.has_value() ? baseline->const_data_ptr<double>() : nullptr;
  const int64_t* idx = index.has_value() ? index->const_data_ptr<int64_t>() : nullptr;
  double* a = acc.mutable_data_ptr<double>();
  const int64_t n_slots = acc.size(0);
  for (size_t row = 0; row < sums.size(); ++row) {  // serial: samples may share a slot
    const int64_t slot = idx != nullptr ? idx[row] : static_cast<int64_t>(row);
    TORCH_CHECK_VALUE(slot >= 0 && slot < n_slots, "fastbound: index contains id ", slot, " outside [0, ", n_slots,
                      ")");
    const double value = w[row] * (sums[row] - (c != nullptr ? c[row] : 0.0));
    a[2 * slot] += value;
    a[2 * slot + 1] += value * value;
  }
}

}  // namespace

TORCH_LIBRARY_IMPL(fastbound, CPU, m) {
  m.impl("continuous_denoising_loss", &continuous_denoising_loss);
  m.impl("continuous_integrate_step", &continuous_integrate_step);
}

}  // namespace cpu
}  // namespace fastbound
