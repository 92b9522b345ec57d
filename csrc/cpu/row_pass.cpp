// The two vectorised row loops of the CPU loss kernels (row_pass.h), compiled
// once per x86-64 level (FB_CPU_CLONES), and the ISA report (vectorize.h).
#include "row_pass.h"

#include <algorithm>
#include <cmath>
#include <limits>

#include "convert.h"
#include "fastbound/elementwise.h"
#include "vectorize.h"

namespace fastbound {
namespace cpu {

template <typename scalar_t, typename acc_t>
FB_CPU_CLONES RowSums<acc_t> row_pass(const scalar_t* s, scalar_t* g, int64_t n, acc_t shift,
                                      acc_t scale, acc_t offset) {
  acc_t sum_exp = 0, sum_score = 0;
  if (g == nullptr) {
#pragma omp simd reduction(+ : sum_exp, sum_score)
    for (int64_t i = 0; i < n; ++i) {
      const acc_t v = to_acc(s[i]);
      sum_exp += exp_acc(v - shift);
      sum_score += v;
    }
  } else {
#pragma omp simd reduction(+ : sum_exp, sum_score)
    for (int64_t i = 0; i < n; ++i) {
      const acc_t v = to_acc(s[i]);
      const acc_t e = exp_acc(v - shift);
      sum_exp += e;
      sum_score += v;
      g[i] = from_acc<scalar_t>(scale * e + offset);
    }
  }
  return {sum_exp, sum_score};
}

template <typename scalar_t, typename acc_t>
FB_CPU_CLONES acc_t row_max(const scalar_t* s, int64_t n) {
  acc_t m = -std::numeric_limits<acc_t>::infinity();
#pragma omp simd reduction(max : m)
  for (int64_t i = 0; i < n; ++i) {
    const acc_t v = to_acc(s[i]);
    m = v > m ? v : m;
  }
  return m;
}

#define FB_INSTANTIATE(scalar_t, acc_t)                                                         \
  template RowSums<acc_t> row_pass<scalar_t, acc_t>(const scalar_t*, scalar_t*, int64_t, acc_t, \
                                                    acc_t, acc_t);                              \
  template acc_t row_max<scalar_t, acc_t>(const scalar_t*, int64_t);
FB_INSTANTIATE(float, float)
FB_INSTANTIATE(double, double)
FB_INSTANTIATE(c10::Half, float)
FB_INSTANTIATE(c10::BFloat16, float)
#undef FB_INSTANTIATE

const char* isa_name() {
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && defined(__linux__)
  if (__builtin_cpu_supports("x86-64-v4")) return "avx512";
  if (__builtin_cpu_supports("x86-64-v3")) return "avx2";
#endif
  return "baseline";
}

}  // namespace cpu
}  // namespace fastbound
