// Denoising score entropy (SEDD's loss), CUDA kernels: one streaming pass per
// row reads every score once and writes the gradient in the same pass; the
// per-row constants (fastbound/elementwise.h) depend on sigma and the ids
// only, so they are known before the row is read. Mirrors csrc/cpu/dse.cpp.
#include "fastbound/elementwise.h"
#include "loss_rows.cuh"
#include "losses.cuh"

namespace fastbound {
namespace gpu {
namespace {

// Absorbing graph: only masked positions (x_t == V-1) contribute.
//   loss = scale * (sum_{y < V-1} e^{s_y} - r s_{x0} + r (log r - 1))
//   grad = scale * (e^{s_y} - r [y = x0]) for y < V-1, 0 in the mask column.
template <typename scalar_t>
struct DseAbsorbRows {
  using acc_t = acc_type<scalar_t>;
  const acc_t* sigma;
  int64_t ignore_index;

  template <typename Group>
  FB_HD void operator()(const Group& group, const LossBatch<scalar_t>& b, int64_t row) const {
    const int64_t v = b.n_cols, mask = v - 1, x_t = b.x_t[row], x0 = b.x0[row];
    if (!in_range(x_t, v)) return finish_row(group, b, row, quiet_nan<acc_t>());
    if (x0 == ignore_index || x_t != mask) return finish_row(group, b, row, acc_t(0));
    if (!in_range(x0, mask)) return finish_row(group, b, row, quiet_nan<acc_t>());
    const RowPointers<scalar_t> p = row_pointers(b, row);
    const AbsorbRow<acc_t> k(sigma[row]);
    const acc_t scale = b.row_scale[row];
    const acc_t s_x0 = to_acc(p.score[x0]);
    group.sync();  // every thread has read s[x0] before the pass may overwrite it (in place)
    ExpPass<acc_t> pass(mask, x0, acc_t(0), scale, acc_t(0), -scale * k.r);
    for_each_column(group, p.score, p.grad, v, pass);
    const Pair<acc_t> sums = group.allreduce(Pair<acc_t>{pass.sum_exp, pass.sum_score}, AddPairs<acc_t>());
    if (group.rank() == 0) b.loss[row] = scale * k.loss(sums.a, s_x0);
  }
};

// Uniform graph: every position contributes; column x_t is left out.
//   grad = scale * ((e^{s_y} - c) / N - [x_t != x0][y = x0] / a) for y != x_t, 0 at x_t.
template <typename scalar_t>
struct DseUniformRows {
  using acc_t = acc_type<scalar_t>;
  const acc_t* sigma;
  int64_t ignore_index;

  template <typename Group>
  FB_HD void operator()(const Group& group, const LossBatch<scalar_t>& b, int64_t row) const {
    const int64_t v = b.n_cols, x_t = b.x_t[row], x0 = b.x0[row];
    if (!in_range(x_t, v)) return finish_row(group, b, row, quiet_nan<acc_t>());
    if (x0 == ignore_index) return finish_row(group, b, row, acc_t(0));
    if (!in_range(x0, v)) return finish_row(group, b, row, quiet_nan<acc_t>());
    const RowPointers<scalar_t> p = row_pointers(b, row);
    const UniformRow<acc_t> k(sigma[row], v, x_t == x0);
    const acc_t scale = b.row_scale[row];
    const acc_t s_x0 = to_acc(p.score[x0]);
    group.sync();  // every thread has read s[x0] before the pass may overwrite it (in place)
    const acc_t x0_term = k.same ? acc_t(0) : -scale * k.inv_a;
    ExpPass<acc_t> pass(x_t, x0, acc_t(0), scale * k.inv_n, -scale * k.c * k.inv_n, x0_term);
    for_each_column(group, p.score, p.grad, v, pass);
    const Pair<acc_t> sums = group.allreduce(Pair<acc_t>{pass.sum_exp, pass.sum_score}, AddPairs<acc_t>());
    if (group.rank() == 0) b.loss[row] = scale * k.loss(sums.a, sums.b, s_x0);
  }
};

}  // namespace

template <typename scalar_t>
cudaError_t launch_dse(const LossBatch<scalar_t>& batch, const acc_type<scalar_t>* sigma, int64_t graph,
                       int64_t ignore_index, cudaStream_t stream) {
  if (graph == kGraphAbsorb) {
    return launch_loss_rows(batch, DseAbsorbRows<scalar_t>{sigma, ignore_index}, stream);
  }
  if (graph == kGraphUniform) {
    return launch_loss_rows(batch, DseUniformRows<scalar_t>{sigma, ignore_index}, stream);
  }
  return cudaErrorInvalidValue;
}

#define FB_INSTANTIATE(scalar_t)                                                                       \
  template cudaError_t launch_dse<scalar_t>(const LossBatch<scalar_t>&, const acc_type<scalar_t>*, int64_t, \
                                            int64_t, cudaStream_t);
FB_INSTANTIATE(float)
FB_INSTANTIATE(double)
FB_INSTANTIATE(__half)
FB_INSTANTIATE(__nv_bfloat16)
#undef FB_INSTANTIATE

}  // namespace gpu
}  // namespace fastbound
