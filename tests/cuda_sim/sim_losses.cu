// Host simulation of the fused-loss CUDA row code (csrc/cuda/losses.cu and the
// row functors of loss_row_kernels.cuh), for machines without a GPU. Built and
// run by .ci/nvcc-check.sh:
//
//   nvcc -std=c++17 -O1 -I csrc/include -o sim tests/cuda_sim/sim_losses.cu && ./sim
//
// Each row is run by a group of real threads (sim_common.h) through the loss
// kernel's own per-row step. Every group size, dtype, loss, mask column, row
// length, row alignment and the in-place path are compared with a plain
// double-precision evaluation of the formulas, and the padding between rows is
// checked to be untouched. Exits non-zero on a mismatch. It checks the index
// arithmetic and the algebra, not GPU memory semantics or launch
// configuration: the GPU tests (tests/test_cuda_losses.py) do that.
#include <cstdlib>
#include <cstring>
#include <random>

#include "../../csrc/cuda/losses.cu"
#include "sim_common.h"

namespace fastbound {
namespace gpu {
namespace sim {

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

  std::vector<int64_t> x_t(n_rows), x0(n_rows);
  std::vector<acc_t> sigma(n_rows), scale(n_rows), loss(n_rows, acc_t(-7));
  std::uniform_real_distribution<double> unit(0.05, 3.0);
  for (int64_t i = 0; i < n_rows; ++i) {
    std::uniform_int_distribution<int64_t> token(0, v - 1);
    x0[i] = token(rng);
    if (op != Op::kUniform && mask_id < v && x0[i] == mask_id) x0[i] = (mask_id + 1) % v;
    const int64_t kind = i % 6;  // the mix of row kinds every batch covers
    x_t[i] = op == Op::kUniform ? (kind == 1 ? x0[i] : std::uniform_int_distribution<int64_t>(0, v - 1)(rng))
                                : mask_id;
    if (kind == 2) x0[i] = ignore_index;
    if (kind == 3 && op != Op::kUniform) x_t[i] = 0;                   // not masked: no contribution
    if (kind == 4) x0[i] = op == Op::kDce ? v + 3 : v;                  // x0 out of range
    if (kind == 4 && op == Op::kAbsorb && i >= 6) x0[i] = mask_id;     // x0 is the mask
    if (kind == 5 && op == Op::kDce && mask_id < v) x0[i] = mask_id;    // x0 is the mask
    if (kind == 5 && op != Op::kDce) x_t[i] = -2;                       // x_t out of range
    sigma[i] = acc_t(unit(rng));
    scale[i] = acc_t(unit(rng));
  }
  // Score entropy: a sigma that is not positive and finite makes a running row NaN (rows 6
  // and 7 run) and changes nothing in a row that does not run (row 8 is ignored).
  if (op != Op::kDce) {
    const acc_t bad_sigmas[] = {acc_t(0), acc_t(-1), acc_t(INFINITY), acc_t(NAN)};
    sigma[6] = bad_sigmas[v % 4];
    sigma[7] = bad_sigmas[(v + threads) % 4];
    sigma[8] = acc_t(NAN);
  }

  std::vector<scalar_t> grad_buf;
  LossBatch<scalar_t> batch{score_buf.data() + offset, stride, nullptr, 0, x_t.data(), x0.data(),
                            op == Op::kDce ? nullptr : sigma.data(), scale.data(), loss.data(), n_rows, v};
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

  visit_row_fn(spec_of(op, mask_id, ignore_index), [&](const auto& row_fn) {
    for (int64_t i = 0; i < n_rows; ++i) {
      run_group(threads, [&](const SimGroup& group) { loss_row(group, batch, row_fn, i); });
    }
    return cudaSuccess;
  });

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
            // The mask as the last column, the first column, a middle one, and (DCE) outside the logits.
            std::vector<int64_t> masks{-1};
            if (op == Op::kAbsorb) masks = {v - 1, 0, v / 2};
            if (op == Op::kDce) masks = {v - 1, 0, v};
            for (int64_t mask_id : masks) {
              check_case<scalar_t>(op, v, threads, offset, pad, mode, mask_id, rng);
              ++cases;
            }
          }
        }
      }
    }
  }
  std::printf("  %s: %d cases, %d failures\n", dtype_name(sizeof(scalar_t), std::is_same<scalar_t, __half>::value),
              cases, failures - before);
  return cases;
}

}  // namespace sim
}  // namespace gpu
}  // namespace fastbound

int main() {
  using namespace fastbound::gpu::sim;
  return sim_main("the CUDA loss rows", 1234,
                  [](auto type, std::mt19937& rng) { run_all<typename decltype(type)::type>(rng); });
}
