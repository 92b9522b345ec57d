// Host simulation of the CUDA integration step (csrc/cuda/integrate.cu), for
// machines without a GPU. Built and run by .ci/nvcc-check.sh:
//
//   nvcc -std=c++17 -O1 -I csrc/include -o sim tests/cuda_sim/sim_integrate.cu && ./sim
//
// Each work item (a chunk of one sequence's rows) is run by a group of real
// threads (sim_common.h) through the kernel's own per-item step, then the
// accumulator update runs once per slot-ordered sequence as its threads do.
// Every loss, dtype, group size, chunk size, mask column and sharing of
// accumulator rows (and rows out of range, which are skipped) is compared with
// a double-precision evaluation of the formulas summed in sequence order; the
// bad-id rows and the rows of a bad sigma must give NaN sums. Exits non-zero on a mismatch.
#include <cstdlib>
#include <numeric>
#include <random>

#include "../../csrc/cuda/integrate.cu"
#include "sim_common.h"

namespace fastbound {
namespace gpu {
namespace sim {

struct Case {
  Op op;
  int64_t n_seq, length, v, mask_id;
  int threads;
  int64_t rows_per_chunk;
  bool shared_slots;
};

template <typename scalar_t>
void check_case(const Case& c, std::mt19937& rng) {
  const int64_t ignore_index = -100, pad = 3, stride_l = c.v + pad, stride_b = c.length * stride_l + 5;
  std::normal_distribution<double> normal(0.0, 2.0);
  std::uniform_real_distribution<double> unit(0.05, 3.0);
  std::vector<scalar_t> out(c.n_seq * stride_b + 1);
  for (auto& x : out) x = from_double<scalar_t>(normal(rng));
  std::vector<int64_t> x_t(c.n_seq * c.length), x0(c.n_seq * c.length);
  for (int64_t k = 0; k < int64_t(x0.size()); ++k) {
    x0[k] = std::uniform_int_distribution<int64_t>(0, c.v - 1)(rng);
    if (c.op != Op::kUniform && x0[k] == c.mask_id) x0[k] = (c.mask_id + 1) % c.v;
    const int64_t kind = k % 5;
    x_t[k] = c.op == Op::kUniform ? std::uniform_int_distribution<int64_t>(0, c.v - 1)(rng) : c.mask_id;
    if (kind == 1) x0[k] = ignore_index;
    if (kind == 2 && c.op != Op::kUniform) x_t[k] = (c.mask_id + 1) % c.v;  // not masked
  }
  // One bad id in sequence 1 (when there is one): its sum must be NaN.
  const int64_t bad_seq = c.n_seq > 1 && c.length > 0 ? 1 : -1;
  if (bad_seq >= 0) x0[bad_seq * c.length] = c.v + 2, x_t[bad_seq * c.length] = c.op == Op::kUniform ? 0 : c.mask_id;
  std::vector<double> sigma(c.n_seq), weight(c.n_seq);
  for (int64_t b = 0; b < c.n_seq; ++b) sigma[b] = unit(rng), weight[b] = unit(rng);
  // A score-entropy sequence with sigma = 0: the sums of its running rows are NaN (expected_row).
  if (c.op != Op::kDce && c.n_seq > 2) sigma[2] = 0.0;

  // Accumulator rows: b, or a few shared rows plus one out of range (skipped).
  const int64_t n_slots = c.shared_slots ? 3 : c.n_seq;
  std::vector<int64_t> index(c.n_seq);
  for (int64_t b = 0; b < c.n_seq; ++b) index[b] = c.shared_slots ? (b * 7 + 1) % 4 : b;  // 3 is out of range
  std::vector<int64_t> order(c.n_seq), slot(c.n_seq);
  std::iota(order.begin(), order.end(), int64_t(0));
  std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return index[a] < index[b]; });
  for (int64_t j = 0; j < c.n_seq; ++j) slot[j] = index[order[j]];
  std::vector<double> acc(2 * n_slots), expected(2 * n_slots);
  for (int64_t k = 0; k < 2 * n_slots; ++k) acc[k] = expected[k] = unit(rng);

  const int64_t n_chunks = integrate_chunks(c.length, c.rows_per_chunk);
  std::vector<double> partial(c.n_seq * n_chunks, -7.0);
  IntegrateBatch<scalar_t> p{out.data(), stride_b, stride_l, c.n_seq, c.length, c.v, x_t.data(), x0.data(),
                             sigma.data(), weight.data(), c.shared_slots ? order.data() : nullptr,
                             c.shared_slots ? slot.data() : nullptr, acc.data(), n_slots, partial.data()};
  visit_row_fn(spec_of(c.op, c.mask_id, ignore_index), [&](const auto& row_fn) {
    for (int64_t item = 0; item < c.n_seq * n_chunks; ++item) {
      run_group(c.threads, [&](const SimGroup& group) {
        integrate_item(group, p, row_fn, item, c.rows_per_chunk, n_chunks);
      });
    }
    return cudaSuccess;
  });
  for (int64_t j = 0; j < c.n_seq; ++j) integrate_finish(p, j, n_chunks);

  for (int64_t b = 0; b < c.n_seq; ++b) {
    double total = 0;
    for (int64_t i = 0; i < c.length; ++i) {
      std::vector<double> s(c.v);
      for (int64_t y = 0; y < c.v; ++y) s[y] = to_double(out[b * stride_b + i * stride_l + y]);
      const int64_t pos = b * c.length + i;
      total += expected_row(c.op, s, double(acc_type<scalar_t>(sigma[b])), x_t[pos], x0[pos], 1.0, c.mask_id,
                            ignore_index).loss;
    }
    const int64_t at = index[b];
    if (at >= n_slots) continue;
    expected[2 * at] += weight[b] * total;
    expected[2 * at + 1] += weight[b] * total * weight[b] * total;
  }
  const double tol = 4 * tolerance<scalar_t>();
  char where[160];
  std::snprintf(where, sizeof(where), "op=%d size=%zu B=%lld L=%lld V=%lld mask=%lld threads=%d rows=%lld shared=%d",
                int(c.op), sizeof(scalar_t), (long long)c.n_seq, (long long)c.length, (long long)c.v,
                (long long)c.mask_id, c.threads, (long long)c.rows_per_chunk, int(c.shared_slots));
  for (int64_t k = 0; k < 2 * n_slots; ++k) {
    if (!close(acc[k], expected[k], tol)) {
      fail(std::string(where) + " acc[" + std::to_string(k) + "] " + std::to_string(acc[k]) + " want " +
           std::to_string(expected[k]));
    }
  }
  if (bad_seq >= 0 && index[bad_seq] < n_slots && !std::isnan(acc[2 * index[bad_seq]])) {
    fail(std::string(where) + " a bad id did not give NaN");
  }
}

template <typename scalar_t>
void run_all(std::mt19937& rng) {
  const int before = failures;
  int cases = 0;
  for (Op op : {Op::kAbsorb, Op::kUniform, Op::kDce}) {
    for (int64_t v : {2, 5, 33}) {
      const std::vector<int64_t> masks = op == Op::kUniform ? std::vector<int64_t>{-1}
                                         : op == Op::kAbsorb ? std::vector<int64_t>{v - 1, 0}
                                                             : std::vector<int64_t>{v - 1, 0, v};
      for (int64_t mask_id : masks) {
        for (int threads : {1, 3}) {
          for (int64_t length : {0, 1, 7}) {
            for (int64_t rows_per_chunk : {int64_t(1), int64_t(3), std::max<int64_t>(length, 1)}) {
              for (bool shared : {false, true}) {
                check_case<scalar_t>({op, 5, length, v, mask_id, threads, rows_per_chunk, shared}, rng);
                ++cases;
              }
            }
          }
        }
      }
    }
  }
  std::printf("  %s: %d cases, %d failures\n", dtype_name(sizeof(scalar_t), std::is_same<scalar_t, __half>::value),
              cases, failures - before);
}

}  // namespace sim
}  // namespace gpu
}  // namespace fastbound

int main() {
  using namespace fastbound::gpu::sim;
  return sim_main("the CUDA integration step", 4321,
                  [](auto type, std::mt19937& rng) { run_all<typename decltype(type)::type>(rng); });
}
