// Constants of the likelihood integration step (`fastbound::integrate_step`),
// shared by the CPU and CUDA kernels and the Python layer (`fastbound/integrate.py`).
#pragma once

#include <cstdint>

namespace fastbound {

// Which per-token loss the integration step sums.
constexpr int kLossDse = 0;  // score entropy (SEDD), graph chosen by kGraphAbsorb / kGraphUniform
constexpr int kLossDce = 1;  // masked cross-entropy (MDLM)

// Rows of one sequence that one work item (a CPU task, a CUDA block) reduces:
// about 32K scores, at least one row and at most the whole sequence.
inline int64_t integrate_rows_per_chunk(int64_t n_positions, int64_t n_cols) {
  const int64_t target = int64_t(1) << 15;
  int64_t rows = n_cols > 0 ? (target + n_cols - 1) / n_cols : n_positions;
  if (rows > n_positions) rows = n_positions;
  return rows < 1 ? 1 : rows;
}

}  // namespace fastbound
