#!/usr/bin/env bash
# Compile check of the CUDA kernels, for machines without a GPU.
#
#   1. Compiles every csrc/cuda/*.cu (torch-free) for sm_90, with the plain
#      flags (c++17) and again with the flags a torch CUDA build uses (the C++
#      standard of the installed torch, c++20 for torch 2.13, setup.py's nvcc
#      flags and torch's no-implicit-half-conversion macros); stops at the
#      first file that fails.
#   2. Builds and runs the host simulations tests/cuda_sim/sim_*.cu: the loss
#      kernels' and the integration step's row code run by thread groups of
#      std::threads against a double-precision evaluation of the formulas (no
#      GPU needed).
#   3. Syntax-checks the torch bindings (csrc/cuda/*.cpp) with the host
#      compiler, in torch's C++ standard, when the installed torch ships the c10/cuda headers (the CPU
#      wheels do) and the CUDA headers are found. This is a syntax and
#      template-instantiation check only: linking them needs a CUDA torch
#      (libc10_cuda), which only a CUDA build (setup.py) exercises.
#
# Exits 0 with a message when nvcc is absent. Usage: .ci/nvcc-check.sh
set -euo pipefail
cd "$(dirname "$0")/.."

NVCC="${NVCC:-$(command -v nvcc || true)}"
if [[ -z "$NVCC" ]]; then
  echo "nvcc-check: nvcc not found; skipping the CUDA compile check"
  exit 0
fi
"$NVCC" --version | tail -n 1

tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
flags=(-O3 -gencode arch=compute_90,code=sm_90 -I csrc/include)
# torch's extension build (torch.utils.cpp_extension, torch 2.13) compiles with -std=c++20.
torch_std="${TORCH_CXX_STD:-c++20}"
plain_flags=(-std=c++17 "${flags[@]}")
torch_flags=(-std="$torch_std" "${flags[@]}" -lineinfo --expt-relaxed-constexpr -D__CUDA_NO_HALF_OPERATORS__
  -D__CUDA_NO_HALF_CONVERSIONS__ -D__CUDA_NO_BFLOAT16_CONVERSIONS__ -D__CUDA_NO_HALF2_OPERATORS__)

shopt -s nullglob
sources=(csrc/cuda/*.cu)
if [[ ${#sources[@]} -eq 0 ]]; then
  echo "nvcc-check: no csrc/cuda/*.cu files"
  exit 1
fi
for src in "${sources[@]}"; do
  if ! "$NVCC" "${plain_flags[@]}" -c -o "$tmp/$(basename "$src").o" "$src"; then
    echo "nvcc-check: FAILED $src"
    exit 1
  fi
  if ! "$NVCC" "${torch_flags[@]}" -c -o "$tmp/$(basename "$src").torch.o" "$src"; then
    echo "nvcc-check: FAILED $src (torch extension flags, -std=$torch_std)"
    exit 1
  fi
  echo "nvcc-check: ok $src (c++17, and torch's flags with $torch_std)"
done

# The simulations' device-side copies of the row code instantiated with their
# host-only thread group are never used; nvcc warns about them (20014).
for sim in tests/cuda_sim/sim_*.cu; do
  bin="$tmp/$(basename "$sim" .cu)"
  if ! "$NVCC" -std=c++17 -O1 -diag-suppress 20014 -gencode arch=compute_90,code=sm_90 -I csrc/include \
      -o "$bin" "$sim"; then
    echo "nvcc-check: FAILED to build $sim"
    exit 1
  fi
  if ! "$bin"; then
    echo "nvcc-check: FAILED $sim"
    exit 1
  fi
  echo "nvcc-check: ok $sim"
done

torch_include="$(python -c 'import os, torch; print(os.path.dirname(torch.__file__))' 2>/dev/null || true)"
torch_include="${torch_include:+$torch_include/include}"
cuda_include="${CUDA_HOME:-/usr/local/cuda}/include"
bindings=(csrc/cuda/*.cpp)
if [[ ! -f "$torch_include/c10/cuda/CUDAGuard.h" || ! -f "$cuda_include/cuda_runtime_api.h" ]]; then
  echo "nvcc-check: skipping the syntax check of the bindings (needs torch's c10/cuda headers and $cuda_include)"
elif [[ ${#bindings[@]} -gt 0 ]]; then
  cxx="${CXX:-g++}"
  for src in "${bindings[@]}"; do
    # C10_CUDA_NO_CMAKE_CONFIGURE_FILE: the CPU wheels lack the generated c10/cuda/impl/cuda_cmake_macros.h.
    if ! "$cxx" -std="$torch_std" -fsyntax-only -DC10_CUDA_NO_CMAKE_CONFIGURE_FILE -isystem "$torch_include" \
        -isystem "$torch_include/torch/csrc/api/include" -isystem "$cuda_include" -I csrc/include -I csrc "$src"; then
      echo "nvcc-check: FAILED (host syntax) $src"
      exit 1
    fi
    echo "nvcc-check: ok (host syntax only) $src"
  done
fi
echo "nvcc-check: all passed"
