// Fused continuous noising (fastbound.continuous.perturb), CPU kernel.
//
// One pass over x: each element draws its Philox words from its own counter
// (the contract in csrc/include/fastbound/continuous.h), forms eps and the
// warm-up noise u, and writes z = alpha_b (x + warm_std u) + sigma_b eps, eps
// and (when asked) x_warm = x + warm_std u. Work is split into (row, tile)
// tasks, so the result does not depend on the number of threads; per tile the
// words come from the AVX2 Philox (continuous_words.h), then one vectorised
// loop forms the noise and the outputs.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>
#include <type_traits>

#include "continuous_words.h"
#include "convert.h"
#include "fastbound/continuous.h"
#include "common/continuous_checks.h"
#include "vectorize.h"

namespace fastbound {
namespace cpu {
namespace {

constexpr int64_t kTile = 512;            // elements per tile: their words stay in L1
constexpr int64_t kMinPerThread = 16384;  // below this, one thread

// z, eps and x_warm of one tile from its words in the compute type; kLaw a compile-time
// law so the loop vectorises.
template <typename acc_t, int kLaw>
FB_CPU_CLONES void transform_tile(const acc_t* x, acc_t* z, acc_t* eps, acc_t* x_warm, const uint32_t* w0,
                                  const uint32_t* w1, const uint32_t* w2, int64_t n, acc_t alpha, acc_t sigma,
                                  acc_t warm_std) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) {
    const auto v = continuous::noise<acc_t, kLaw>(w0[j], w1[j], w2[j]);
    const acc_t xw = kLaw == continuous::kWarmNone ? x[j] : x[j] + warm_std * v.warm;
    z[j] = alpha * xw + sigma * v.eps;
    eps[j] = v.eps;
    x_warm[j] = xw;
  }
}

// A bfloat16 / float16 tile goes through float buffers: the conversions inline into the
// noise loop keep GCC from vectorising it.
template <typename scalar_t>
FB_CPU_CLONES void widen(const scalar_t* in, float* out, int64_t n) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) out[j] = to_acc(in[j]);
}
template <typename scalar_t>
FB_CPU_CLONES void round_to(const float* in, scalar_t* out, int64_t n) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) out[j] = from_acc<scalar_t>(in[j]);
}

// The laws that read w2 (Gaussian warm-up noise is the Box-Muller partner of eps).
constexpr bool reads_w2(int law) { return law != continuous::kWarmNone && law != continuous::kWarmGaussian; }

template <typename scalar_t>
struct PerturbRows {
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t* x;
  const acc_t *alpha, *sigma;
  scalar_t *z, *eps, *x_warm;  // x_warm may be null
  int64_t cols;
  int law;
  acc_t warm_std;
  uint64_t seed, offset;

  // One tile; w holds 3 kTile words (w2 left unset for a law that never reads it), buffer
  // 4 kTile compute-type values.
  void tile(int64_t row, int64_t col, int64_t n, uint32_t* w, acc_t* buffer) const {
    const int64_t first = row * cols + col;
    uint32_t *w0 = w, *w1 = w + kTile, *w2 = w + 2 * kTile;
    continuous_tile_words(seed, offset, static_cast<uint64_t>(first), n, w0, w1, reads_w2(law) ? w2 : nullptr);
    continuous::with_law(law, [&](auto tag) {
      constexpr int kLaw = decltype(tag)::value;
      if constexpr (std::is_same_v<scalar_t, acc_t>) {
        acc_t* xw = x_warm != nullptr ? x_warm + first : buffer;
        transform_tile<acc_t, kLaw>(x + first, z + first, eps + first, xw, w0, w1, w2, n, alpha[row], sigma[row],
                                    warm_std);
      } else {
        acc_t *xf = buffer, *zf = buffer + kTile, *ef = buffer + 2 * kTile, *wf = buffer + 3 * kTile;
        widen(x + first, xf, n);
        transform_tile<acc_t, kLaw>(xf, zf, ef, wf, w0, w1, w2, n, alpha[row], sigma[row], warm_std);
        round_to(zf, z + first, n);
        round_to(ef, eps + first, n);
        if (x_warm != nullptr) round_to(wf, x_warm + first, n);
      }
    });
  }
};

std::tuple<at::Tensor, at::Tensor, at::Tensor> continuous_perturb(const at::Tensor& x, const at::Tensor& alpha,
                                                                  const at::Tensor& sigma, int64_t warm,
                                                                  double warm_std, int64_t seed, int64_t offset,
                                                                  bool return_warm) {
  continuous::check_perturb(x, alpha, sigma, warm);
  at::Tensor z = at::empty_like(x), eps = at::empty_like(x);
  at::Tensor x_warm = return_warm ? at::empty_like(x) : at::empty({0}, x.options());
  const int64_t rows = x.size(0), cols = x.size(1);
  if (x.numel() == 0) return {z, eps, x_warm};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "continuous_perturb_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const PerturbRows<scalar_t> p{x.const_data_ptr<scalar_t>(), alpha.const_data_ptr<acc_t>(),
                                  sigma.const_data_ptr<acc_t>(), z.mutable_data_ptr<scalar_t>(),
                                  eps.mutable_data_ptr<scalar_t>(),
                                  return_warm ? x_warm.mutable_data_ptr<scalar_t>() : nullptr, cols,
                                  static_cast<int>(warm), static_cast<acc_t>(warm_std), static_cast<uint64_t>(seed),
                                  static_cast<uint64_t>(offset)};
    const int64_t tiles_per_row = (cols + kTile - 1) / kTile;
    const int64_t grain = std::max<int64_t>(1, kMinPerThread / std::min(cols, kTile));
    at::parallel_for(0, rows * tiles_per_row, grain, [&](int64_t begin, int64_t end) {
      uint32_t words[3 * kTile];
      acc_t buffer[4 * kTile];  // x_warm when it is not returned, or the float tiles of a 16-bit x
      for (int64_t task = begin; task < end; ++task) {
        const int64_t row = task / tiles_per_row, col = (task % tiles_per_row) * kTile;
        p.tile(row, col, std::min(kTile, cols - col), words, buffer);
      }
    });
  });
  return {z, eps, x_warm};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastbound, CPU, m) { m.impl("continuous_perturb", &continuous_perturb); }

}  // namespace cpu
}  // namespace fastbound
