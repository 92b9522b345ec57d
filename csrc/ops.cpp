// The `fastbound` operator library: every op's schema, in one place.
// Backends add implementations with TORCH_LIBRARY_IMPL (csrc/cpu/*.cpp, and
// csrc/cuda/*_binding.cpp when built with CUDA); fake (meta) implementations
// and autograd formulas are registered from Python in `fastbound/_ops.py`.
#include <Python.h>
#include <torch/library.h>

#include "cpu/buffer_pool.h"
#include "cpu/vectorize.h"

TORCH_LIBRARY(fastbound, m) {
  // Losses: flattened (N, V) scores, per-row sigma / scale and ids. Return the
  // per-row loss (N,) and, when need_grad, d loss / d score (N, V). mask_id is
  // the absorbing graph's mask column: in [0, V) for the DSE (ignored, pass -1,
  // for graph=uniform); any id for the DCE (>= V: logits without a mask column).
  m.def(
      "dse_forward(Tensor score, Tensor sigma, Tensor x_t, Tensor x0, Tensor row_scale, int graph, "
      "int mask_id, int ignore_index, bool need_grad) -> (Tensor, Tensor)");
  m.def(
      "dse_forward_inplace(Tensor(a!) score, Tensor sigma, Tensor x_t, Tensor x0, Tensor row_scale, "
      "int graph, int mask_id, int ignore_index) -> Tensor");
  m.def(
      "dce_forward(Tensor logits, Tensor x_t, Tensor x0, Tensor row_scale, int mask_id, "
      "int ignore_index, bool need_grad) -> (Tensor, Tensor)");
  m.def(
      "dce_forward_inplace(Tensor(a!) logits, Tensor x_t, Tensor x0, Tensor row_scale, int mask_id, "
      "int ignore_index) -> Tensor");
  // The backward of a fused loss (contract: csrc/common/scale_rows.h): grad[i] *= factor[i] in place
  // for each row i of the saved (N, V) gradient, except rows the loss wrote as zeros (x0[i] ==
  // ignore_index; x_t[i] != mask_id when mask_id >= 0) and rows whose factor is 1. factor is (N,)
  // of the accumulation dtype, any stride.
  m.def(
      "scale_rows_(Tensor(a!) grad, Tensor factor, Tensor? x_t, Tensor? x0, int mask_id, int ignore_index) -> ()");
  // The value checks of the public losses on CPU tensors (csrc/cpu/check_ids.cpp): raises a
  // ValueError naming the first bad id, or sigma (when given) not positive and finite.
  // loss, graph, mask_id, ignore_index as in dse_forward / dce_forward.
  m.def(
      "check_loss_ids(Tensor x_t, Tensor x0, Tensor? sigma, int n_cols, int loss, int graph, int mask_id, "
      "int ignore_index) -> ()");
  // The public losses' common call on CPU tensors, with a C++ autograd (csrc/cpu/fused_loss_autograd.cpp):
  // scores (..., V), ids of shape S = score.shape[:-1]; sigma (DSE only) and weight broadcastable to S,
  // else the floats sigma_value / weight_value for every row; reduction 0 none (a loss of shape S),
  // 1 sum, 2 mean (scalars). Runs check_loss_ids and dse_forward / dce_forward; differentiable in score
  // only. loss, graph, mask_id, ignore_index as in check_loss_ids.
  m.def(
      "fused_loss(Tensor score, Tensor? sigma, float sigma_value, Tensor x_t, Tensor x0, Tensor? weight, "
      "float weight_value, int loss, int graph, int mask_id, int ignore_index, int reduction) -> Tensor");
  // Noise (fastbound/noise.py; the random-number contract is csrc/include/fastbound/philox.h).
  // x0 (B, L); exactly one of threshold (int32, (B or 1, L or 1): select iff (w0 >> 8) < threshold)
  // and num_masked (int64 (B,): exactly k per row); maskable bool (B, L). seed and offset are
  // uint64 bit patterns. Returns (x_t, mask).
  m.def(
      "perturb(Tensor x0, Tensor? threshold, Tensor? num_masked, Tensor? maskable, int vocab_size, "
      "int mask_id, int graph, SymInt seed, SymInt offset) -> (Tensor, Tensor)");
  // fastbound.perturb's common eager CPU call (csrc/cpu/perturb.cpp): x0 (B, L) or (L,), any strides;
  // the Bernoulli mode with the noise level `level` (sigma if is_sigma, else mask_ratio: a float
  // tensor shaped as perturb takes it, () or (B,) or (B or 1, L or 1), (L,) per token of an (L,) x0),
  // range-checked and turned into thresholds here, or without it the one `threshold` in [0, 2^24]
  // for every element; maskable bool, broadcastable to x0. Returns (x_t, mask) of x0's shape.
  m.def(
      "perturb_level(Tensor x0, Tensor? level, bool is_sigma, int threshold, Tensor? maskable, int vocab_size, "
      "int mask_id, int graph, SymInt seed, SymInt offset) -> (Tensor, Tensor)");
  // Philox4x32-10 words (N, 4) of the counters (N, 4) (each entry's low 32 bits) under key = seed.
  m.def("philox4x32(Tensor counter, SymInt seed) -> Tensor");
  // Likelihood integration step: per sequence b, S_b = weight_b * sum_i loss_i of the
  // (B, L, V) denoiser output; acc[index_b] += (S_b, S_b^2) in place (float64, no grad).
  // loss: 0 = DSE (graph: 0 absorb, 1 uniform), 1 = DCE; mask_id as in dse_forward / dce_forward.
  m.def(
      "integrate_step(Tensor out, Tensor x_t, Tensor x0, Tensor sigma, Tensor weight, "
      "Tensor(a!) acc, Tensor? index, int loss, int graph, int mask_id, int ignore_index) -> ()");
  // ---- fastbound.continuous (issue 12; kernels csrc/cpu/continuous_*.cpp, csrc/cuda/continuous_*;
  // noise contract csrc/include/fastbound/continuous.h). Tensors are contiguous (B, d); per-row
  // tensors (B,) in the compute type (float32, float64 for float64 data) unless said otherwise;
  // seed and offset are uint64 bit patterns.
  // x (B, d), alpha and sigma (B,); warm: 0 none, 1 gaussian, 2 laplace, 3 logistic, 4 uniform.
  // Returns (z, eps, x_warm); x_warm is empty unless return_warm.
  m.def(
      "continuous_perturb(Tensor x, Tensor alpha, Tensor sigma, int warm, float warm_std, SymInt seed, "
      "SymInt offset, bool return_warm) -> (Tensor, Tensor, Tensor)");
  // loss_b = 0.5 scale_b ||eps_b - eps_hat_b||^2 (B,) and, when need_grad, scale_b (eps_hat - eps).
  // eps None: regenerated from (seed, offset) and rounded to eps_hat's dtype.
  m.def(
      "continuous_denoising_loss(Tensor eps_hat, Tensor? eps, Tensor scale, SymInt seed, SymInt offset, "
      "bool need_grad) -> (Tensor, Tensor)");
  // denoising_loss's common eager call on CPU tensors, with a C++ autograd
  // (csrc/cpu/continuous_loss_autograd.cpp): eps_hat (B, ...) and eps (its shape, or None) of any
  // strides, flattened to (B, d) for continuous_denoising_loss; reduction 0 none (B,), 1 sum, 2 mean
  // (scalars; scale holds the 1/B). Differentiable in eps_hat and scale.
  m.def(
      "continuous_loss(Tensor eps_hat, Tensor? eps, Tensor scale, SymInt seed, SymInt offset, int reduction) -> Tensor");
  // integrate_step's common eager call on CPU tensors (csrc/cpu/continuous_loss_autograd.cpp):
  // eps_hat and eps as in continuous_loss; weight and baseline float64 (B,) tensors (checked finite
  // here) or, when None, the floats weight_value / baseline_value for every sample; no index
  // (acc has one row per sample). Runs continuous_integrate_step and bumps acc's version.
  m.def(
      "continuous_integrate(Tensor eps_hat, Tensor? eps, Tensor(a!) acc, Tensor? weight, float weight_value, "
      "Tensor? baseline, float baseline_value, SymInt seed, SymInt offset) -> ()");
  // S_b = weight_b (||eps_b - eps_hat_b||^2 - baseline_b); acc[index_b] += (S_b, S_b^2).
  // weight, baseline float64 (B,); index int64 (B,); acc (n_slots, 2) float64.
  m.def(
      "continuous_integrate_step(Tensor eps_hat, Tensor? eps, Tensor(a!) acc, Tensor weight, "
      "Tensor? baseline, Tensor? index, SymInt seed, SymInt offset) -> ()");
  // ---- end fastbound.continuous
}

namespace {

PyObject* cpu_isa(PyObject*, PyObject*) { return PyUnicode_FromString(fastbound::cpu::isa_name()); }

PyObject* cpu_buffer_cache(PyObject*, PyObject* args) {
  long long max_bytes = -1;
  if (!PyArg_ParseTuple(args, "|L", &max_bytes)) return nullptr;
  const fastbound::cpu::BufferCache cache = fastbound::cpu::buffer_cache(max_bytes);
  return Py_BuildValue("(LL)", static_cast<long long>(cache.max_bytes), static_cast<long long>(cache.held_bytes));
}

PyMethodDef kMethods[] = {
    {"cpu_isa", cpu_isa, METH_NOARGS,
     "The x86-64 level the CPU kernels run at on this machine: 'avx512', 'avx2' or 'baseline'."},
    {"cpu_buffer_cache", cpu_buffer_cache, METH_VARARGS,
     "cpu_buffer_cache([max_bytes]) -> (max_bytes, held_bytes): the pool of reused CPU output buffers."},
    {nullptr, nullptr, 0, nullptr}};

PyModuleDef kModule = {PyModuleDef_HEAD_INIT, "_C", "fastbound's compiled operators.", -1, kMethods};

}  // namespace

PyMODINIT_FUNC PyInit__C() { return PyModule_Create(&kModule); }
