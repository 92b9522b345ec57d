// Host simulation of the fused-loss CUDA row code (csrc/cuda/dse.cu, dce.cu),
// for machines without a GPU. Built and run by .ci/nvcc-check.sh:
//
//   nvcc -std=c++17 -O1 -I csrc/include -o sim tests/cuda_sim/sim_losses.cu && ./sim
//
// The row functors of the kernels are `__host__ __device__`; here each row is
// run by a group of real threads (std::thread) whose sync() is a barrier and
// whose allreduce() exchanges values through shared slots, as a warp or a
// block does on the GPU. Every group size, dtype, graph, row length, row
// alignment and the in-place path are compared with a plain double-precision
// evaluation of the formulas (fastbound/reference.py), and the padding
// between rows is checked to be untouched. Exits non-zero on the first
// mismatch. It checks the index arithmetic and the algebra, not GPU memory
// semantics or launch configuration: the GPU tests (tests/test_cuda_losses.py)
// do that.
#include <condition_variable>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "../../csrc/cuda/dce.cu"
#include "../../csrc/cuda/dse.cu"

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

// Runs row_fn over every row of the batch, each row by `threads` threads.
template <typename scalar_t, typename RowFn>
void run_rows(const LossBatch<scalar_t>& batch, const RowFn& row_fn, int threads) {
  for (int64_t row = 0; row < batch.n_rows; ++row) {
    GroupState state(threads);
    std::vector<std::thread> pool;
    for (int t = 0; t < threads; ++t) {
      pool.emplace_back([&, t] { row_fn(SimGroup{&state, t}, batch, row); });
    }
    for (auto& th : pool) th.join();
  }
}

double to_double(float x) { return x; }
double to_double(double x) { return x; }
double to_double(__half x) { return __half2float(x); }
double to_double(__nv_bfloat16 x) { return __bfloat162float(x); }

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

// The expected loss and gradient of one row, in double, straight from the formulas.
struct Expected {
  double loss;
  std::vector<double> grad;
};

enum class Op { kAbsorb, kUniform, kDce };

Expected expected_row(Op op, const std::vector<double>& s, double sigma, int64_t x_t, int64_t x0, double scale,
                      int64_t mask_id, int64_t ignore_index) {
  const int64_t v = int64_t(s.size());
  const double nan = std::nan("");
  Expected e{0.0, std::vector<double>(v, 0.0)};
  auto bad = [&] { return Expected{nan, std::vector<double>(v, nan)}; };
  if (op == Op::kAbsorb) {
    if (x_t < 0 || x_t >= v) return bad();
    if (x0 == ignore_index || x_t != v - 1) return e;
    if (x0 < 0 || x0 >= v - 1) return bad();
    const double r = 1.0 / std::expm1(sigma);
    double sum = 0;
    for (int64_t y = 0; y < v - 1; ++y) {
      sum += std::exp(s[y]);
      e.grad[y] = scale * (std::exp(s[y]) - (y == x0 ? r : 0.0));
    }
    e.loss = scale * (sum - r * s[x0] + r * (std::log(r) - 1));
  } else if (op == Op::kUniform) {
    if (x_t < 0 || x_t >= v) return bad();
    if (x0 == ignore_index) return e;
    if (x0 < 0 || x0 >= v) return bad();
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

bool close(double got, double want, double tol) {
  if (std::isnan(want)) return std::isnan(got);
  return std::fabs(got - want) <= tol * (1.0 + std::fabs(want));
}

int failures = 0;

void fail(const std::string& what) {
  if (failures < 20) std::printf("FAIL %s\n", what.c_str());
  ++failures;
}

enum class GradMode { kNone, kSeparate, kSeparateMisaligned, kInPlace };

// One batch: rows of random ids (including ignored, unmasked and bad ones),
// scores at an `offset`-element misalignment with `pad` elements between rows.
template <typename scalar_t>
void check_case(Op op, int64_t v, int threads, int64_t offset, int64_t pad, GradMode mode, int64_t mask_id,
                std::mt19937& rng) {
  using acc_t = acc_type<scalar_t>;
  const int64_t n_rows = 12, stride = v + pad, ignore_index = -100;
  const scalar_t sentinel = from_double<scalar_t>(12345.0);
  std::normal_distribution<double> normal(0.0, 2.0);
  std::vector<scalar_t> score_buf(offset + n_rows * stride + 8, sentinel);
  for (int64_t i = 0; i < n_rows; ++i)
    for (int64_t y = 0; y < v; ++y) score_buf[offset + i * stride + y] = from_double<scalar_t>(normal(rng));
  const std::vector<scalar_t> original = score_buf;

  const int64_t mask_col = op == Op::kAbsorb ? v - 1 : mask_id;
  std::vector<int64_t> x_t(n_rows), x0(n_rows);
  std::vector<acc_t> sigma(n_rows), scale(n_rows), loss(n_rows, acc_t(-7));
  std::uniform_real_distribution<double> unit(0.05, 3.0);
  for (int64_t i = 0; i < n_rows; ++i) {
    const int64_t n_tokens = op == Op::kAbsorb ? v - 1 : v;
    std::uniform_int_distribution<int64_t> token(0, n_tokens > 0 ? n_tokens - 1 : 0);
    x0[i] = token(rng);
    if (op == Op::kDce && mask_id < v && x0[i] == mask_id) x0[i] = (mask_id + 1) % v;
    const int64_t kind = i % 6;  // the mix of row kinds every batch covers
    x_t[i] = op == Op::kUniform ? (kind == 1 ? x0[i] : std::uniform_int_distribution<int64_t>(0, v - 1)(rng))
                                : mask_col;
    if (kind == 2) x0[i] = ignore_index;
    if (kind == 3 && op != Op::kUniform) x_t[i] = 0;                   // not masked: no contribution
    if (kind == 4) x0[i] = op == Op::kDce ? v + 3 : n_tokens;           // x0 out of range
    if (kind == 5 && op == Op::kDce && mask_id < v) x0[i] = mask_id;    // x0 is the mask
    if (kind == 5 && op != Op::kDce) x_t[i] = -2;                       // x_t out of range
    sigma[i] = acc_t(unit(rng));
    scale[i] = acc_t(unit(rng));
  }

  std::vector<scalar_t> grad_buf;
  LossBatch<scalar_t> batch{score_buf.data() + offset, stride, nullptr, 0, x_t.data(), x0.data(),
                            scale.data(), loss.data(), n_rows, v};
  int64_t grad_offset = 0;
  if (mode == GradMode::kSeparate || mode == GradMode::kSeparateMisaligned) {
    grad_offset = mode == GradMode::kSeparate ? offset : offset + 1;
    grad_buf.assign(grad_offset + n_rows * stride + 8, sentinel);
    batch.grad = grad_buf.data() + grad_offset;
    batch.grad_stride = stride;
  } else if (mode == GradMode::kInPlace) {
    batch.grad = score_buf.data() + offset;
    batch.grad_stride = stride;
  }

  if (op == Op::kAbsorb) run_rows(batch, DseAbsorbRows<scalar_t>{sigma.data(), ignore_index}, threads);
  if (op == Op::kUniform) run_rows(batch, DseUniformRows<scalar_t>{sigma.data(), ignore_index}, threads);
  if (op == Op::kDce) run_rows(batch, DceRows<scalar_t>{mask_id, ignore_index}, threads);

  const std::vector<scalar_t>& out_buf = mode == GradMode::kInPlace ? score_buf : grad_buf;
  const double tol = tolerance<scalar_t>();
  char where[200];
  for (int64_t i = 0; i < n_rows; ++i) {
    std::snprintf(where, sizeof(where),
                  "op=%d size=%zu v=%lld threads=%d offset=%lld pad=%lld mode=%d mask=%lld row=%lld",
                  int(op), sizeof(scalar_t), (long long)v, threads, (long long)offset, (long long)pad, int(mode),
                  (long long)mask_id, (long long)i);
    std::vector<double> s(v);
    for (int64_t y = 0; y < v; ++y) s[y] = to_double(original[offset + i * stride + y]);
    const Expected e = expected_row(op, s, sigma[i], x_t[i], x0[i], scale[i], mask_id, ignore_index);
    if (!close(loss[i], e.loss, tol)) {
      fail(std::string(where) + " loss " + std::to_string(loss[i]) + " want " + std::to_string(e.loss));
    }
    if (mode == GradMode::kNone) continue;
    const int64_t base = (mode == GradMode::kInPlace ? offset : grad_offset) + i * stride;
    for (int64_t y = 0; y < v; ++y) {
      if (!close(to_double(out_buf[base + y]), e.grad[y], tol)) {
        fail(std::string(where) + " grad[" + std::to_string(y) + "] " + std::to_string(to_double(out_buf[base + y])) +
             " want " + std::to_string(e.grad[y]));
      }
    }
  }
  // Nothing outside the rows may change: the padding, the head and the tail of both buffers.
  auto untouched = [&](const std::vector<scalar_t>& buf, int64_t start, const char* name) {
    for (int64_t k = 0; k < int64_t(buf.size()); ++k) {
      const int64_t rel = k - start;
      const bool in_row = rel >= 0 && rel < n_rows * stride && rel % stride < v;
      if (!in_row && to_double(buf[k]) != to_double(sentinel)) {
        fail(std::string(where) + " wrote outside the rows of " + name);
      }
    }
  };
  untouched(score_buf, offset, "score");
  if (!grad_buf.empty()) untouched(grad_buf, grad_offset, "grad");
  const size_t n_bytes = score_buf.size() * sizeof(scalar_t);
  if (mode != GradMode::kInPlace && std::memcmp(score_buf.data(), original.data(), n_bytes) != 0) {
    fail(std::string(where) + " modified the scores");
  }
}

template <typename scalar_t>
int run_all(std::mt19937& rng) {
  const int before = failures;
  int cases = 0;
  for (Op op : {Op::kAbsorb, Op::kUniform, Op::kDce}) {
    for (int64_t v : {2, 3, 7, 8, 9, 17, 33, 100}) {
      for (int threads : {1, 3, 4}) {
        for (int64_t offset : {0, 1, 3}) {
          for (GradMode mode :
               {GradMode::kNone, GradMode::kSeparate, GradMode::kSeparateMisaligned, GradMode::kInPlace}) {
            const int64_t pad = (offset + v) % 3;
            // DCE: the mask as the last column, the first column, and outside the logits.
            const std::vector<int64_t> masks =
                op == Op::kDce ? std::vector<int64_t>{v - 1, 0, v} : std::vector<int64_t>{-1};
            for (int64_t mask_id : masks) {
              check_case<scalar_t>(op, v, threads, offset, pad, mode, mask_id, rng);
              ++cases;
            }
          }
        }
      }
    }
  }
  std::printf("  %s: %d cases, %d failures\n", sizeof(scalar_t) == 8 ? "double" : sizeof(scalar_t) == 4 ? "float"
                                            : std::is_same<scalar_t, __half>::value ? "half" : "bfloat16",
              cases, failures - before);
  return cases;
}

}  // namespace sim
}  // namespace gpu
}  // namespace fastbound

int main() {
  using namespace fastbound::gpu::sim;
  std::mt19937 rng(1234);
  std::printf("host simulation of the CUDA loss rows:\n");
  run_all<float>(rng);
  run_all<double>(rng);
  run_all<__half>(rng);
  run_all<__nv_bfloat16>(rng);
  if (failures) {
    std::printf("%d failures\n", failures);
    return 1;
  }
  std::printf("all passed\n");
  return 0;
}
