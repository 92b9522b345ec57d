"""Build fastbound and its compiled operator library `fastbound._C`.

The C++ CPU kernels are always built. The CUDA kernels (`csrc/cuda/*.cu`) and
their torch binding are added when the installed torch has CUDA and `nvcc` is
found (set FASTBOUND_NO_CUDA=1 to skip them), for TORCH_CUDA_ARCH_LIST, else
the visible GPUs, else (no GPU visible: CI, docker) a default list. The build
prints which path it took. Build against the torch you
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


def _default_cuda_archs() -> str:
    """The architectures to build for when no GPU is visible (CI, docker builds).

    Ampere, Ada and Hopper (and Blackwell where the CUDA toolkit has it), with
    PTX of the newest so that later cards JIT-compile it.
    """
    major, minor = (int(x) for x in torch.version.cuda.split(".")[:2])
    archs = ["8.0", "8.6", "8.9", "9.0"] + (["10.0", "12.0"] if (major, minor) >= (12, 8) else [])
    return ";".join(archs) + "+PTX"


def _cuda_archs() -> str:
    """Sets TORCH_CUDA_ARCH_LIST when it is unset and no GPU is visible; says where the list came from.

    Without it torch's own detection indexes the empty list of visible devices and fails.
    """
    if os.environ.get("TORCH_CUDA_ARCH_LIST"):
        return f"{os.environ['TORCH_CUDA_ARCH_LIST']} (from TORCH_CUDA_ARCH_LIST)"
    if torch.cuda.is_available() and torch.cuda.device_count() > 0:
        caps = sorted({torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())})
        return ";".join(f"{a}.{b}" for a, b in caps) + " (the visible GPUs)"
    os.environ["TORCH_CUDA_ARCH_LIST"] = _default_cuda_archs()
    return f"{os.environ['TORCH_CUDA_ARCH_LIST']} (default: no GPU is visible; set TORCH_CUDA_ARCH_LIST to choose)"


def _extension():
    # -fopenmp: ATen's parallel_for is OpenMP in the torch wheels; without the
    # flag its pragma is ignored and every kernel runs on one thread. The
    # library resolves to the libgomp.so.1 that torch already loaded.
    # -Wno-psabi: the row loops' GCC vectors (csrc/cpu/vectorize.h) never cross a
    # call (their helpers are always inlined), so GCC's AVX-ABI note does not apply.
    cxx_flags = ["-O3", "-fopenmp", "-fno-math-errno", "-Wno-psabi"]
    include_dirs = [os.path.join(HERE, "csrc", "include"), os.path.join(HERE, "csrc")]
    sources = _sources("csrc/*.cpp") + _sources("csrc/cpu/*.cpp")
    nvcc = shutil.which("nvcc") or (CUDA_HOME and os.path.exists(os.path.join(CUDA_HOME, "bin", "nvcc")))
    if os.environ.get("FASTBOUND_NO_CUDA"):
        cpu_only = "FASTBOUND_NO_CUDA is set"
    elif torch.version.cuda is None:
        cpu_only = f"torch {torch.__version__} has no CUDA"
    elif not nvcc:
        cpu_only = "nvcc was not found (set CUDA_HOME or put nvcc on PATH)"
    else:
        cpu_only = None
    if cpu_only:
        print(f"fastbound: building the C++ CPU kernels only: {cpu_only}")
        return CppExtension(
            "fastbound._C",
            sources,
            include_dirs=include_dirs,
            extra_compile_args={"cxx": cxx_flags},
            extra_link_args=["-fopenmp"],
        )
    print(f"fastbound: building the CPU and CUDA kernels with CUDA {torch.version.cuda} for archs {_cuda_archs()}")
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
    install_requires=["torch>=2.6", "numpy"],
    extras_require={
        "triton": ["triton"],
        "train": ["tqdm", "matplotlib", "scikit-learn"],
        "test": ["pytest", "pytest-benchmark", "scipy", "triton", "hypothesis", "tqdm", "matplotlib", "scikit-learn"],
    },
    ext_modules=[_extension()],
    cmdclass={"build_ext": BuildExtension},
)
