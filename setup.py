"""Build fastbound and its compiled operator library `fastbound._C`.

The C++ CPU kernels are always built. The CUDA kernels (`csrc/cuda/*.cu`) and
their torch binding are added when the installed torch has CUDA and `nvcc` is
found (set FASTBOUND_NO_CUDA=1 to skip them). Build against the torch you
have, without an isolated build environment that would fetch another one:

    pip install --no-build-isolation -e .
"""

import glob
import os
import shutil

import torch
from setuptools import find_packages, setup
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

HERE = os.path.dirname(os.path.abspath(__file__))


def _sources(pattern: str) -> list[str]:
    return sorted(os.path.relpath(p, HERE) for p in glob.glob(os.path.join(HERE, pattern)))


def _extension():
    # -fopenmp: ATen's parallel_for is OpenMP in the torch wheels; without the
    # flag its pragma is ignored and every kernel runs on one thread. The
    # library resolves to the libgomp.so.1 that torch already loaded.
    cxx_flags = ["-O3", "-fopenmp", "-fno-math-errno"]
    include_dirs = [os.path.join(HERE, "csrc", "include"), os.path.join(HERE, "csrc")]
    sources = _sources("csrc/*.cpp") + _sources("csrc/cpu/*.cpp")
    nvcc = shutil.which("nvcc") or (CUDA_HOME and os.path.exists(os.path.join(CUDA_HOME, "bin", "nvcc")))
    with_cuda = torch.version.cuda is not None and bool(nvcc) and not os.environ.get("FASTBOUND_NO_CUDA")
    if not with_cuda:
        return CppExtension(
            "fastbound._C",
            sources,
            include_dirs=include_dirs,
            extra_compile_args={"cxx": cxx_flags},
            extra_link_args=["-fopenmp"],
        )
    sources += _sources("csrc/cuda/*.cu") + _sources("csrc/cuda/*.cpp")
    # No --use_fast_math: it flushes subnormals and approximates exp/division,
    # which would make the CUDA kernels disagree with the shared CPU math.
    nvcc_flags = ["-O3", "-lineinfo"]
    return CUDAExtension(
        "fastbound._C",
        sources,
        include_dirs=include_dirs,
        define_macros=[("FASTBOUND_WITH_CUDA", "1")],
        extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags},
        extra_link_args=["-fopenmp"],
    )


setup(
    name="fastbound",
    version="0.1.0",
    description="Fused kernels for likelihood-exact discrete diffusion losses and NLL estimators",
    packages=find_packages(include=["fastbound", "fastbound.*"]),
    python_requires=">=3.10",
    install_requires=["torch>=2.6", "numpy", "tqdm", "matplotlib"],
    extras_require={"triton": ["triton"], "test": ["pytest", "pytest-benchmark", "scipy", "triton"]},
    ext_modules=[_extension()],
    cmdclass={"build_ext": BuildExtension},
)
