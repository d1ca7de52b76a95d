"""Builds diffrec_ext._C: a CUDAExtension when torch is a CUDA build and nvcc is found, else a
CppExtension. DIFFREC_EXT_CUDA=0 forces the CPU-only build, =1 demands CUDA (fails without nvcc).
TORCH_CUDA_ARCH_LIST picks the GPU architectures (default 8.0;9.0+PTX: machine code for the A100 and
H100/H200, plus sm_90 PTX that the driver compiles for newer GPUs)."""

import glob
import os
import re
from pathlib import Path

import torch
from setuptools import setup
from torch.utils import cpp_extension

VERSION = re.search(r'__version__ = "([^"]+)"', (Path(__file__).parent / "diffrec_ext" / "_version.py").read_text())[1]
DEFAULT_ARCHS = "8.0;9.0+PTX"


def want_cuda() -> bool:
    choice = os.environ.get("DIFFREC_EXT_CUDA", "auto").lower()
    if choice not in ("auto", "0", "1"):
        raise SystemExit(f"DIFFREC_EXT_CUDA must be auto, 0 or 1, got {choice!r}")
    available = torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None
    if choice == "1" and not available:
        raise SystemExit(
            "DIFFREC_EXT_CUDA=1 but torch is not a CUDA build or nvcc was not found "
            f"(torch.version.cuda={torch.version.cuda}, CUDA_HOME={cpp_extension.CUDA_HOME})"
        )
    return available and choice != "0"


def pip_cuda_include_dirs() -> list[str]:
    """Header folders of the pip CUDA packages (nvidia/cu13/include, ...): torch's CUDA headers
    include cublas_v2.h and cusparse.h, which a plain CUDA toolkit install may lack."""
    try:
        import nvidia
    except ImportError:
        return []
    return sorted(
        folder for root in nvidia.__path__ for folder in glob.glob(os.path.join(root, "*", "include"))
        if any(os.path.exists(os.path.join(folder, h)) for h in ("cublas_v2.h", "cusparse.h"))
    )


def extension():
    sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp") + glob.glob("python/*.cpp"))
    cxx = ["-O3", f'-DDIFFREC_EXT_VERSION="{VERSION}"']
    if os.name != "nt":
        cxx += ["-fopenmp"]
    if not want_cuda():
        return cpp_extension.CppExtension(
            "diffrec_ext._C", sources, include_dirs=[os.path.abspath("csrc")],
            extra_compile_args={"cxx": cxx}, extra_link_args=["-fopenmp"],
        )
    archs = os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_ARCHS)
    cuda_flags = ["-DDIFFREC_WITH_CUDA", f'-DDIFFREC_CUDA_ARCHS="{archs}"']
    return cpp_extension.CUDAExtension(
        "diffrec_ext._C",
        sources + sorted(glob.glob("csrc/cuda/*.cu")),
        include_dirs=[os.path.abspath("csrc"), *pip_cuda_include_dirs()],
        extra_compile_args={
            "cxx": cxx + cuda_flags,
            # No --use_fast_math: it flushes tiny probabilities to zero in the linear-domain top-k
            # but not in the log-domain rank, so the two ops (and the CPU) would disagree. The
            # kernels call fast intrinsics explicitly where the result's order cannot change.
            "nvcc": ["-O3", "-lineinfo", *cuda_flags, f'-DDIFFREC_EXT_VERSION="{VERSION}"'],
        },
        extra_link_args=["-fopenmp"],
    )


setup(
    version=VERSION,
    ext_modules=[extension()],
    cmdclass={"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)},
)
