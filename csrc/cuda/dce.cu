// Denoising cross-entropy (MDLM's loss, the I-MDCE integrand), CUDA kernels.
// Per masked row: an online log-sum-exp that reads the row once, then one pass
// that writes softmax - onehot(x0). The mask column, when it is a column of
// the logits, is left out of the softmax. Mirrors csrc/cpu/dce.cpp.
#include <cmath>

#include "fastbound/elementwise.h"
#include "loss_rows.cuh"
#include "losses.cuh"

namespace fastbound {
namespace gpu {
namespace {

//   lse  = log sum_{y != mask} e^{s_y}
//   loss = scale * (lse - s_{x0})
//   grad = scale * (e^{s_y - lse} - [y = x0]) for y != mask, 0 in the mask column.
template <typename scalar_t>
struct DceRows {
  using acc_t = acc_type<scalar_t>;
  int64_t mask_id;
  int64_t ignore_index;

  template <typename Group>
  FB_HD void operator()(const Group& group, const LossBatch<scalar_t>& b, int64_t row) const {
    const int64_t v = b.n_cols, x_t = b.x_t[row], x0 = b.x0[row];
    if (x0 == ignore_index || x_t != mask_id) return finish_row(group, b, row, acc_t(0));
    if (!in_range(x0, v) || x0 == mask_id) return finish_row(group, b, row, quiet_nan<acc_t>());
    const RowPointers<scalar_t> p = row_pointers(b, row);
    const int64_t skip = mask_id < v ? mask_id : -1;
    const acc_t scale = b.row_scale[row];
    const acc_t s_x0 = to_acc(p.score[x0]);
    OnlineLogSumExp<acc_t> online(skip);
    for_each_column(group, p.score, static_cast<scalar_t*>(nullptr), v, online);
    const Pair<acc_t> m_sum =
        group.allreduce(Pair<acc_t>{online.running_max, online.sum}, MergeLogSumExp<acc_t>());
    group.sync();  // every thread has read the row and s[x0] before the gradient pass may overwrite them
    const acc_t lse = m_sum.a + log(m_sum.b);
    if (p.grad != nullptr) {
      ExpPass<acc_t> pass(skip, x0, lse, scale, acc_t(0), -scale);
      for_each_column(group, p.score, p.grad, v, pass);
    }
    if (group.rank() == 0) b.loss[row] = scale * (lse - s_x0);
  }
};

}  // namespace

template <typename scalar_t>
cudaError_t launch_dce(const LossBatch<scalar_t>& batch, int64_t mask_id, int64_t ignore_index,
                       cudaStream_t stream) {
  return launch_loss_rows(batch, DceRows<scalar_t>{mask_id, ignore_index}, stream);
}

#define FB_INSTANTIATE(scalar_t) \
  template cudaError_t launch_dce<scalar_t>(const LossBatch<scalar_t>&, int64_t, int64_t, cudaStream_t);
FB_INSTANTIATE(float)
FB_INSTANTIATE(double)
FB_INSTANTIATE(__half)
FB_INSTANTIATE(__nv_bfloat16)
#undef FB_INSTANTIATE

}  // namespace gpu
}  // namespace fastbound
