// Element and per-row math shared by the C++ CPU kernels and the CUDA kernels.
//
// Everything here is header-only, torch-free and `__host__ __device__`, so the
// two backends evaluate the same formulas in the same order.
//
// Sources of the formulas:
//   * Score entropy (DSE): Lou, Meng & Ermon, "Discrete Diffusion Modeling by
//     Estimating the Ratios of the Data Distribution" (SEDD, ICML 2024),
//     `graph_lib.py` (`Absorbing.score_entropy`, `Uniform.score_entropy`).
//   * Cross entropy (DCE): Sahoo et al., "Simple and Effective Masked Diffusion
//     Language Models" (MDLM, NeurIPS 2024); Jeon et al., "Information-Theoretic
//     Discrete Diffusion" (2025), the I-MDCE relation.
#pragma once

#include <cmath>
#include <cstdint>

#include "fastbound/host_device.h"

namespace fastbound {

// Graph codes shared with the Python layer (`fastbound/_ops.py`).
constexpr int kGraphAbsorb = 0;
constexpr int kGraphUniform = 1;

// Loss codes shared with the Python layer (`fastbound/integrate.py`).
constexpr int kLossDse = 0;  // score entropy (SEDD), graph chosen by kGraphAbsorb / kGraphUniform
constexpr int kLossDce = 1;  // masked cross-entropy (MDLM)

// Which per-row loss a kernel evaluates, and the ids that decide a row's role:
// rows whose x0 is ignore_index contribute nothing; mask_id is the absorbing
// graph's mask column (DSE: in [0, V); DCE: any id, >= V when the logits have
// no mask column); the uniform graph has no mask.
struct LossSpec {
  int64_t loss;   // kLossDse / kLossDce
  int64_t graph;  // kGraphAbsorb / kGraphUniform (DSE only)
  int64_t mask_id;
  int64_t ignore_index;
};

// The id rules of every loss row, for both backends: what a row with ids
// (x_t, x0) does. The CPU kernels raise a ValueError naming a bad id; the CUDA
// kernels give the row a NaN loss and gradient.
enum class RowRole { kRun, kSkip, kBadXt, kBadX0, kX0IsMask };

FB_HD bool id_in_range(int64_t id, int64_t n) { return id >= 0 && id < n; }

// Absorbing graph (DSE absorbing, DCE): a row runs where x_t is the mask, with
// x0 in [0, V) and not the mask; rows whose x0 is ignore_index, or whose x_t
// is another id, are skipped (loss 0, zero gradient). The DSE also requires
// x_t in [0, V) on every row (`check_x_t`, judged first); the DCE accepts any
// x_t, and a mask_id >= V (logits without a mask column).
struct MaskIds {
  int64_t mask_id, ignore_index;
  FB_HD explicit MaskIds(const LossSpec& spec) : mask_id(spec.mask_id), ignore_index(spec.ignore_index) {}
  FB_HD RowRole role(int64_t x_t, int64_t x0, int64_t n_cols, bool check_x_t) const {
    if (check_x_t && !id_in_range(x_t, n_cols)) return RowRole::kBadXt;
    if (x0 == ignore_index || x_t != mask_id) return RowRole::kSkip;
    if (!id_in_range(x0, n_cols)) return RowRole::kBadX0;
    return x0 == mask_id ? RowRole::kX0IsMask : RowRole::kRun;
  }
};

// Uniform graph (DSE): every row with x_t and x0 in [0, V) runs, except rows
// whose x0 is ignore_index (x_t is judged first).
FB_HD RowRole uniform_role(int64_t x_t, int64_t x0, int64_t n_cols, int64_t ignore_index) {
  if (!id_in_range(x_t, n_cols)) return RowRole::kBadXt;
  if (x0 == ignore_index) return RowRole::kSkip;
  return id_in_range(x0, n_cols) ? RowRole::kRun : RowRole::kBadX0;
}

// ---------------------------------------------------------------------------
// exp
// ---------------------------------------------------------------------------
// e^x for float, written so that a compiler can vectorise it with no library
// call: Cody-Waite range reduction x = n ln2 + r, |r| <= ln2/2, a degree-6
// polynomial for e^r (fitted for relative error, ~0.3 ulp on its own; the
// result is within 2^-23 relative, ~1 ulp), and 2^n applied as two
// exponent-built factors 2^(n/2) 2^(n - n/2), so that results near FLT_MAX and
// in the subnormal range come out right. Overflow gives +inf, underflow 0, NaN
// stays NaN. n = round(x / ln2) comes from the 1.5 * 2^23 shifter trick, whose
// sum t holds n in its low mantissa bits (no float -> int conversion).
//
// `exp_lanes<Lanes>` evaluates it on `Lanes::F`, one float (`ScalarLanes`) or
// a GCC vector of floats (the CPU row loops, csrc/cpu/vectorize.h), with the
// same formula, so every lane agrees with exp_f32 (to the FMA contraction).
// `Lanes` supplies the float and int32 lane types, a broadcast of a constant,
// and the reinterpretation of float bits as int32 and back.
struct ScalarLanes {
  using F = float;
  using I = int32_t;
  static FB_HD F splat(float c) { return c; }
  static FB_HD F as_float(I i) { return bit_cast<F>(i); }
  static FB_HD I as_int(F x) { return bit_cast<I>(x); }
};

// The reduction and polynomial of exp_lanes: e^x = p 2^n for |x| <= 104 (n
// also as a float, k, for an exponent-scaling instruction).
template <typename Lanes>
struct ExpParts {
  typename Lanes::F p;
  typename Lanes::I n;
  typename Lanes::F k;
};

template <typename Lanes>
FB_HD ExpParts<Lanes> exp_parts(typename Lanes::F x) {
  using F = typename Lanes::F;
  // t = 1.5 * 2^23 + n exactly: round-to-nearest that vectorises on every x86
  // level, and n is the difference of the bit patterns (t stays in [2^23, 2^24)).
  const float shifter = 12582912.0f;
  const F t = x * 1.44269504088896341f + shifter;
  const F n = t - shifter;
  F r = x - n * 0.693359375f;  // ln2 in two parts: n * 0.693359375 is exact
  r = r - n * -2.12194440e-4f;
  // Coefficients of the relative-error fit of e^r on [-ln2/2, ln2/2] (Lawson's
  // iteration over Chebyshev points), rounded to float; Estrin's scheme
  // (1 + r) + r^2 ((c2 + c3 r) + r^2 ((c4 + c5 r) + c6 r^2)) has half the
  // dependent multiply-adds of Horner's rule, which bound the CPU row loops.
  const F r2 = r * r;
  const F lo = r + 1.0f;
  const F mid = r * 1.6666419804096222e-1f + 4.9999991059303284e-1f;
  const F hi = r2 * 1.3836845755577087e-3f + (r * 8.374815806746483e-3f + 4.166822507977486e-2f);
  const F p = r2 * (r2 * hi + mid) + lo;
  return {p, Lanes::as_int(t) - Lanes::as_int(Lanes::splat(shifter)), n};
}

template <typename Lanes>
FB_HD typename Lanes::F exp_lanes(typename Lanes::F x) {
  using F = typename Lanes::F;
  using I = typename Lanes::I;
  const F lo = Lanes::splat(-103.972084f), hi = Lanes::splat(88.7228394f);  // e^lo < FLT_TRUE_MIN / 2, e^hi ~ FLT_MAX
  const ExpParts<Lanes> e = exp_parts<Lanes>(x < lo ? lo : (x > hi ? hi : x));
  const I n1 = e.n >> 1, n2 = e.n - n1;  // both in [-75, 64]: normal powers of two
  F y = (e.p * Lanes::as_float((n1 + 127) << 23)) * Lanes::as_float((n2 + 127) << 23);
  y = x < lo ? Lanes::splat(0.0f) : y;
  y = x > hi ? Lanes::splat(INFINITY) : y;
  return x != x ? x : y;
}

// exp_lanes for |x| <= kExpNormalBound, where e^x is a normal float: the same
// p 2^n (exact either way), formed by adding n to the exponent bits of p
// (p in [1/sqrt 2, sqrt 2], a normal result) without the range fix-ups.
constexpr float kExpNormalBound = 87.0f;

template <typename Lanes>
FB_HD typename Lanes::F exp_lanes_normal(typename Lanes::F x) {
  const ExpParts<Lanes> e = exp_parts<Lanes>(x);
  return Lanes::as_float(Lanes::as_int(e.p) + e.n * (1 << 23));  // |n| <= 126: no overflow
}

FB_HD float exp_f32(float x) {
#if defined(__CUDA_ARCH__)
  return expf(x);
#else
  return exp_lanes<ScalarLanes>(x);
#endif
}

FB_HD double exp_acc(double x) { return exp(x); }
FB_HD float exp_acc(float x) { return exp_f32(x); }

// ---------------------------------------------------------------------------
// Per-row constants
// ---------------------------------------------------------------------------
// log(e^sigma - 1), finite for every finite sigma > 0: log(expm1(sigma)) while
// e^sigma is far from overflow (expm1 keeps the digits of small sigma), and
// sigma + log1p(-e^-sigma) above. Every per-row constant is formed from it, so
// a huge sigma gives finite constants (r -> 0) instead of inf * 0 = NaN.
template <typename acc_t>
FB_HD acc_t log_expm1(acc_t sigma) {
  return sigma < acc_t(20) ? log(expm1(sigma)) : sigma + log1p(-exp(-sigma));
}

// Absorbing-graph score entropy (SEDD), at a masked position with clean token x0:
//   l = sum_{y < V-1} e^{s_y} - r s_{x0} + r (log r - 1),   r = 1 / (e^sigma - 1)
// dl/ds_y = e^{s_y} - r [y = x0] for y < V-1, and 0 in the mask column V-1.
// With log_a = log(e^sigma - 1): r = e^{-log_a} and r (log r - 1) = -r (log_a + 1).
template <typename acc_t>
struct AbsorbRow {
  acc_t r;      // 1 / (e^sigma - 1)
  acc_t konst;  // r (log r - 1)
  AbsorbRow() = default;  // unset (csrc/cpu/loss_row_kernels.h's SigmaMemo fills it before use)
  FB_HD explicit AbsorbRow(acc_t sigma) {
    const acc_t log_a = log_expm1(sigma);
    r = exp(-log_a);
    konst = -r * (log_a + acc_t(1));
  }
  // Loss from the two reductions the kernel makes.
  FB_HD acc_t loss(acc_t sum_exp_real, acc_t s_x0) const { return sum_exp_real - r * s_x0 + konst; }
};

// Uniform-graph score entropy (SEDD `Uniform.score_entropy`), N = V states,
// a = e^sigma - 1, rho = a / (a + N). With S_e = sum_{y != x_t} e^{s_y} and
// S_s = sum_{y != x_t} s_y:
//   pos   = S_e / N
//   neg   = rho S_s / N                          if x_t == x0
//         = s_{x0} / a + S_s / N                 otherwise
//   const = (N-1)/N rho (log rho - 1)            if x_t == x0
//         = ((-log rho - 1) / rho - (N - 2)) / N  otherwise
//   l = pos - neg + const
// dl/ds_y = [y != x_t] (e^{s_y} - c) / N - [x_t != x0][y = x0] / a,
// with c = rho if x_t == x0 else 1. Formed from 1/a = e^{-log_a} as
// rho = 1 / (1 + N/a) and log rho = -log1p(N/a), finite for every sigma.
// The constants of a row that depend on sigma and N only (the transcendental part).
template <typename acc_t>
struct UniformSigma {
  acc_t inv_a, rho, log_rho;
  UniformSigma() = default;  // unset, as AbsorbRow's
  FB_HD UniformSigma(acc_t sigma, int64_t n_states) {
    const acc_t n = static_cast<acc_t>(n_states);
    inv_a = exp(-log_expm1(sigma));
    log_rho = -log1p(n * inv_a);
    rho = acc_t(1) / (acc_t(1) + n * inv_a);
  }
};

template <typename acc_t>
struct UniformRow {
  acc_t inv_n, inv_a, rho, c, konst;
  bool same;
  FB_HD UniformRow(acc_t sigma, int64_t n_states, bool x_t_equals_x0)
      : UniformRow(UniformSigma<acc_t>(sigma, n_states), n_states, x_t_equals_x0) {}
  FB_HD UniformRow(const UniformSigma<acc_t>& k, int64_t n_states, bool x_t_equals_x0) {
    const acc_t n = static_cast<acc_t>(n_states);
    inv_n = acc_t(1) / n;
    inv_a = k.inv_a;
    rho = k.rho;
    same = x_t_equals_x0;
    c = same ? rho : acc_t(1);
    konst = same ? (n - acc_t(1)) * inv_n * rho * (k.log_rho - acc_t(1))
                 : ((-k.log_rho - acc_t(1)) / rho - (n - acc_t(2))) * inv_n;
  }
  // The gradient of every column other than x_t (and x0 when x_t != x0).
  FB_HD acc_t grad(acc_t e) const { return (e - c) * inv_n; }
  FB_HD acc_t loss(acc_t sum_exp_other, acc_t sum_s_other, acc_t s_x0) const {
    const acc_t neg_base = sum_s_other * inv_n;
    const acc_t neg = same ? rho * neg_base : s_x0 * inv_a + neg_base;
    return sum_exp_other * inv_n - neg + konst;
  }
};

}  // namespace fastbound
