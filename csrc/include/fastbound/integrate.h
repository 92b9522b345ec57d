// The work split of the likelihood integration step (`fastbound::integrate_step`),
// shared by the CPU and CUDA kernels. The loss codes are in `elementwise.h`.
#pragma once

#include <cstdint>

namespace fastbound {

// Rows of one sequence that one work item reduces when it holds about
// `target_scores` scores: at least one row and at most the whole sequence.
// The CPU tasks and the CUDA blocks take 2^15 scores; a CUDA warp takes fewer.
inline int64_t integrate_rows_per_chunk(int64_t n_positions, int64_t n_cols,
                                        int64_t target_scores = int64_t(1) << 15) {
  int64_t rows = n_cols > 0 ? (target_scores + n_cols - 1) / n_cols : n_positions;
  if (rows > n_positions) rows = n_positions;
  return rows < 1 ? 1 : rows;
}

// Work items of a (n_seq, n_positions) batch split into chunks of `rows_per_chunk` rows.
inline int64_t integrate_chunks(int64_t n_positions, int64_t rows_per_chunk) {
  return n_positions == 0 ? 0 : (n_positions + rows_per_chunk - 1) / rows_per_chunk;
}

}  // namespace fastbound
