// Fused continuous noising (fastbound.continuous.perturb), CPU kernel.
//
// One pass over x: each element draws its Philox words from its own counter
// (the contract in csrc/include/fastbound/continuous.h), forms eps and the
// warm-up noise u, and writes z = alpha_b (x + warm_std u) + sigma_b eps, eps
// and (when asked) x_warm = x + warm_std u. Work is split into (row, tile)
// tasks, so the result does not depend on the number of threads; per tile the
// words come from the AVX-512 or AVX2 Philox (continuous_words.h), then one loop on vector
// lanes (continuous_lanes.h; 64 of them where wide_lanes()) forms the noise and the outputs.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>
#include <type_traits>

#include "buffer_pool.h"
#include "continuous_lanes.h"
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

// z, eps and (kWarmOut) x_warm of one tile from its words; kLaw a compile-time law.
// Float and 16-bit x: in float, on continuous_lanes' W-lane vectors (16-bit values converted
// in the loads and stores), the last n mod W elements by the same formulas on one float
// (bit-identical but for where GCC fuses a multiply and an add). float64 x: in double.
template <int64_t W, typename scalar_t, int kLaw, bool kWarmOut>
inline __attribute__((always_inline)) void transform_lanes(const scalar_t* x, scalar_t* z, scalar_t* eps,
                                                           scalar_t* x_warm, const uint32_t* w0, const uint32_t* w1,
                                                           const uint32_t* w2, int64_t n,
                                                           at::opmath_type<scalar_t> alpha,
                                                           at::opmath_type<scalar_t> sigma,
                                                           at::opmath_type<scalar_t> warm_std) {
  using acc_t = at::opmath_type<scalar_t>;
  int64_t j = 0;
  if constexpr (std::is_same_v<acc_t, float>) {
    using M = continuous_lanes::VecMath<W>;
    for (; j + W <= n; j += W) {
      const auto v = continuous::noise_of<M, kLaw>(M::load_words(w0 + j), M::load_words(w1 + j), M::load_words(w2 + j));
      const typename M::F xv = M::load(x + j);
      const typename M::F xw = kLaw == continuous::kWarmNone ? xv : xv + warm_std * v.warm;
      M::store(z + j, alpha * xw + sigma * v.eps);
      M::store(eps + j, v.eps);
      if (kWarmOut) M::store(x_warm + j, xw);
    }
  }
  for (; j < n; ++j) {
    const auto v = continuous::noise<acc_t, kLaw>(w0[j], w1[j], w2[j]);
    const acc_t xj = to_acc(x[j]);
    const acc_t xw = kLaw == continuous::kWarmNone ? xj : xj + warm_std * v.warm;
    z[j] = from_acc<scalar_t>(alpha * xw + sigma * v.eps);
    eps[j] = from_acc<scalar_t>(v.eps);
    if (kWarmOut) x_warm[j] = from_acc<scalar_t>(xw);
  }
}

// transform_lanes on kWidth lanes at every ISA level, and on kWideWidth for wide_lanes().
template <typename scalar_t, int kLaw, bool kWarmOut>
FB_CPU_CLONES void transform_tile(const scalar_t* x, scalar_t* z, scalar_t* eps, scalar_t* x_warm,
                                  const uint32_t* w0, const uint32_t* w1, const uint32_t* w2, int64_t n,
                                  at::opmath_type<scalar_t> alpha, at::opmath_type<scalar_t> sigma,
                                  at::opmath_type<scalar_t> warm_std) {
  transform_lanes<continuous_lanes::kWidth, scalar_t, kLaw, kWarmOut>(x, z, eps, x_warm, w0, w1, w2, n, alpha, sigma,
                                                                      warm_std);
}
template <typename scalar_t, int kLaw, bool kWarmOut>
FB_CPU_WIDE void transform_tile_wide(const scalar_t* x, scalar_t* z, scalar_t* eps, scalar_t* x_warm,
                                     const uint32_t* w0, const uint32_t* w1, const uint32_t* w2, int64_t n,
                                     at::opmath_type<scalar_t> alpha, at::opmath_type<scalar_t> sigma,
                                     at::opmath_type<scalar_t> warm_std) {
  transform_lanes<continuous_lanes::kWideWidth, scalar_t, kLaw, kWarmOut>(x, z, eps, x_warm, w0, w1, w2, n, alpha,
                                                                          sigma, warm_std);
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
  bool wide;  // wide_lanes()

  // One tile; w holds 3 kTile words (w2 left unset for a law that never reads it).
  void tile(int64_t row, int64_t col, int64_t n, uint32_t* w) const {
    const int64_t first = row * cols + col;
    uint32_t *w0 = w, *w1 = w + kTile, *w2 = w + 2 * kTile;
    continuous_tile_words(seed, offset, static_cast<uint64_t>(first), n, w0, w1, reads_w2(law) ? w2 : nullptr);
    continuous::with_law(law, [&](auto tag) {
      constexpr int kLaw = decltype(tag)::value;
      const auto run = [&](auto warm_out) {
        constexpr bool kWarmOut = decltype(warm_out)::value;
        const auto transform = wide ? &transform_tile_wide<scalar_t, kLaw, kWarmOut>
                                    : &transform_tile<scalar_t, kLaw, kWarmOut>;
        transform(x + first, z + first, eps + first, kWarmOut ? x_warm + first : nullptr, w0, w1, w2, n, alpha[row],
                  sigma[row], warm_std);
      };
      if (x_warm != nullptr) {
        run(std::true_type{});
      } else {
        run(std::false_type{});
      }
    });
  }
};

std::tuple<at::Tensor, at::Tensor, at::Tensor> continuous_perturb(const at::Tensor& x, const at::Tensor& alpha,
                                                                  const at::Tensor& sigma, int64_t warm,
                                                                  double warm_std, int64_t seed, int64_t offset,
                                                                  bool return_warm) {
  continuous::check_perturb(x, alpha, sigma, warm);
  // Written whole: reused buffers (buffer_pool.h), so a draw loop pays no page faults.
  at::Tensor z = pooled_empty(x.sizes(), x.options()), eps = pooled_empty(x.sizes(), x.options());
  at::Tensor x_warm = return_warm ? pooled_empty(x.sizes(), x.options()) : at::empty({0}, x.options());
  const int64_t rows = x.size(0), cols = x.size(1);
  if (x.numel() == 0) return {z, eps, x_warm};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "continuous_perturb_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const PerturbRows<scalar_t> p{x.const_data_ptr<scalar_t>(), alpha.const_data_ptr<acc_t>(),
                                  sigma.const_data_ptr<acc_t>(), z.mutable_data_ptr<scalar_t>(),
                                  eps.mutable_data_ptr<scalar_t>(),
                                  return_warm ? x_warm.mutable_data_ptr<scalar_t>() : nullptr, cols,
                                  static_cast<int>(warm), static_cast<acc_t>(warm_std), static_cast<uint64_t>(seed),
                                  static_cast<uint64_t>(offset), wide_lanes()};
    const int64_t tiles_per_row = (cols + kTile - 1) / kTile;
    const int64_t grain = std::max<int64_t>(1, kMinPerThread / std::min(cols, kTile));
    at::parallel_for(0, rows * tiles_per_row, grain, [&](int64_t begin, int64_t end) {
      uint32_t words[3 * kTile] = {};  // zeroed: a law without w2 still loads (and ignores) its lanes
      for (int64_t task = begin; task < end; ++task) {
        const int64_t row = task / tiles_per_row, col = (task % tiles_per_row) * kTile;
        p.tile(row, col, std::min(kTile, cols - col), words);
      }
    });
  });
  return {z, eps, x_warm};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastbound, CPU, m) { m.impl("continuous_perturb", &continuous_perturb); }

}  // namespace cpu
}  // namespace fastbound
