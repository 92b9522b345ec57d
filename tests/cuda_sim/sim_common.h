// Shared pieces of the host simulations of the CUDA row code (sim_losses.cu,
// sim_integrate.cu): a thread group made of std::threads, element conversions,
// tolerances, and a plain double-precision evaluation of each row's loss and
// gradient straight from the formulas (fastbound/reference.py).
#pragma once

#include <algorithm>
#include <cmath>
#include <condition_variable>
#include <cstdio>
#include <mutex>
#include <random>
#include <string>
#include <thread>
#include <type_traits>
#include <vector>

#include "../../csrc/cuda/loss_row_kernels.cuh"

namespace fastbound {
namespace gpu {
namespace sim {

// What a warp or a block shares: a barrier and one reduction slot per thread.
struct GroupState {
  explicit GroupState(int n) : size(n), slots(n) {}
  int size;
  std::mutex mutex;
  std::condition_variable arrived_all;
  int arrived = 0;
  long generation = 0;
  std::vector<Pair<double>> slots;  // float partials round-trip through double exactly

  void barrier() {
    std::unique_lock<std::mutex> lock(mutex);
    const long my_generation = generation;
    if (++arrived == size) {
      arrived = 0;
      ++generation;
      arrived_all.notify_all();
    } else {
      arrived_all.wait(lock, [&] { return generation != my_generation; });
    }
  }
};

// A group of real threads standing in for a warp or a block: sync() is a
// barrier and allreduce() exchanges values through shared slots.
struct SimGroup {
  GroupState* state;
  int thread;
  int rank() const { return thread; }
  int size() const { return state->size; }
  void sync() const { state->barrier(); }
  template <typename acc_t, typename Op>
  Pair<acc_t> allreduce(Pair<acc_t> v, Op op) const {
    state->slots[thread] = {double(v.a), double(v.b)};
    sync();
    Pair<acc_t> out{acc_t(state->slots[0].a), acc_t(state->slots[0].b)};
    for (int t = 1; t < size(); ++t) out = op(out, Pair<acc_t>{acc_t(state->slots[t].a), acc_t(state->slots[t].b)});
    sync();
    return out;
  }
};

// Runs fn(group) on `threads` threads that form one group.
template <typename Fn>
void run_group(int threads, const Fn& fn) {
  GroupState state(threads);
  std::vector<std::thread> pool;
  for (int t = 0; t < threads; ++t) pool.emplace_back([&, t] { fn(SimGroup{&state, t}); });
  for (auto& th : pool) th.join();
}

inline double to_double(float x) { return x; }
inline double to_double(double x) { return x; }
inline double to_double(__half x) { return __half2float(x); }
inline double to_double(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename scalar_t>
scalar_t from_double(double x) {
  return from_acc<scalar_t>(acc_type<scalar_t>(x));
}

template <typename scalar_t>
double tolerance() {
  if (sizeof(scalar_t) == 8) return 1e-10;
  if (sizeof(scalar_t) == 4) return 2e-5;
  return std::is_same<scalar_t, __half>::value ? 2e-3 : 1.6e-2;  // one rounding of the gradient
}

// The expected loss and gradient of one row, in double, straight from the
// formulas; mask_id is the absorbing graph's mask column (DSE and DCE).
struct Expected {
  double loss;
  std::vector<double> grad;
};

enum class Op { kAbsorb, kUniform, kDce };

inline LossSpec spec_of(Op op, int64_t mask_id, int64_t ignore_index) {
  if (op == Op::kDce) return {kLossDce, kGraphAbsorb, mask_id, ignore_index};
  return {kLossDse, op == Op::kAbsorb ? kGraphAbsorb : kGraphUniform, mask_id, ignore_index};
}

inline const char* dtype_name(size_t size, bool half) {
  return size == 8 ? "double" : size == 4 ? "float" : half ? "half" : "bfloat16";
}

inline Expected expected_row(Op op, const std::vector<double>& s, double sigma, int64_t x_t, int64_t x0, double scale,
                      int64_t mask_id, int64_t ignore_index) {
  const int64_t v = int64_t(s.size());
  const double nan = std::nan("");
  Expected e{0.0, std::vector<double>(v, 0.0)};
  auto bad = [&] { return Expected{nan, std::vector<double>(v, nan)}; };
  if (op == Op::kAbsorb) {
    if (x_t < 0 || x_t >= v) return bad();
    if (x0 == ignore_index || x_t != mask_id) return e;
    if (x0 < 0 || x0 >= v || x0 == mask_id || !(sigma > 0 && sigma < INFINITY)) return bad();
    const double r = 1.0 / std::expm1(sigma);
    double sum = 0;
    for (int64_t y = 0; y < v; ++y) {
      if (y == mask_id) continue;
      sum += std::exp(s[y]);
      e.grad[y] = scale * (std::exp(s[y]) - (y == x0 ? r : 0.0));
    }
    e.loss = scale * (sum - r * s[x0] + r * (std::log(r) - 1));
  } else if (op == Op::kUniform) {
    if (x_t < 0 || x_t >= v) return bad();
    if (x0 == ignore_index) return e;
    if (x0 < 0 || x0 >= v || !(sigma > 0 && sigma < INFINITY)) return bad();
    const double n = double(v), a = std::expm1(sigma), rho = a / (a + n);
    double mean_exp = 0, mean_s = 0;
    for (int64_t y = 0; y < v; ++y) {
      mean_exp += std::exp(s[y]) / n;
      mean_s += s[y] / n;
    }
    const double pos = mean_exp - std::exp(s[x_t]) / n;
    const double neg_base = mean_s - s[x_t] / n;
    const bool same = x_t == x0;
    const double neg = same ? rho * neg_base : s[x0] / a + neg_base;
    const double konst = same ? (n - 1) / n * rho * (std::log(rho) - 1) : ((-std::log(rho) - 1) / rho - (n - 2)) / n;
    e.loss = scale * (pos - neg + konst);
    for (int64_t y = 0; y < v; ++y) {
      if (y == x_t) continue;
      e.grad[y] = scale * ((std::exp(s[y]) - (same ? rho : 1.0)) / n - (!same && y == x0 ? 1.0 / a : 0.0));
    }
  } else {
    if (x0 == ignore_index || x_t != mask_id) return e;
    if (x0 < 0 || x0 >= v || x0 == mask_id) return bad();
    double m = -INFINITY;
    for (int64_t y = 0; y < v; ++y)
      if (y != mask_id) m = std::max(m, s[y]);
    double sum = 0;
    for (int64_t y = 0; y < v; ++y)
      if (y != mask_id) sum += std::exp(s[y] - m);
    const double lse = m + std::log(sum);
    e.loss = scale * (lse - s[x0]);
    for (int64_t y = 0; y < v; ++y) {
      if (y == mask_id) continue;
      e.grad[y] = scale * (std::exp(s[y] - lse) - (y == x0 ? 1.0 : 0.0));
    }
  }
  return e;
}

inline bool close(double got, double want, double tol) {
  if (std::isnan(want)) return std::isnan(got);
  return std::fabs(got - want) <= tol * (1.0 + std::fabs(want));
}

inline int failures = 0;

inline void fail(const std::string& what) {
  if (failures < 20) std::printf("FAIL %s\n", what.c_str());
  ++failures;
}

// A type as a value, for the generic lambda of sim_main.
template <typename T>
struct Type {
  using type = T;
};

// Runs run_all(Type<scalar_t>{}, rng) for every element type of the kernels;
// the exit status: 0 when nothing failed.
template <typename RunAll>
int sim_main(const char* title, unsigned seed, const RunAll& run_all) {
  std::mt19937 rng(seed);
  std::printf("host simulation of %s:\n", title);
  run_all(Type<float>{}, rng);
  run_all(Type<double>{}, rng);
  run_all(Type<__half>{}, rng);
  run_all(Type<__nv_bfloat16>{}, rng);
  if (failures) {
    std::printf("%d failures\n", failures);
    return 1;
  }
  std::printf("all passed\n");
  return 0;
}

}  // namespace sim
}  // namespace gpu
}  // namespace fastbound
