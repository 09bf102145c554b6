"""Build of effnet_kernels._C: C++ CPU kernels always, CUDA kernels when enabled.

CUDA is compiled when FORCE_CUDA=1, or (unless FORCE_CUDA=0) when torch is a CUDA
build and nvcc is found. Sources are globbed, so a new kernel file needs no edit here.
C++ is compiled without debug info unless EFFNET_DEBUG_INFO=1.
Install with `pip install --no-build-isolation -e .` (torch must already be installed).
"""

import glob
import os
import re
import shutil
import subprocess
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))
DEFAULT_CUDA_ARCHS = "8.0;9.0+PTX"


def nvcc_toolkit_root():
    """The toolkit root nvcc itself reports (a wrapper on PATH can mislead torch)."""
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return None
    try:
        out = subprocess.run(
            [nvcc, "--dryrun", "-c", "-x", "cu", os.devnull, "-o", os.devnull],
            capture_output=True, text=True, timeout=60,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    match = re.search(r"^#\$ TOP=(.*)$", out.stdout + out.stderr, re.MULTILINE)
    return os.path.realpath(match.group(1).strip()) if match else None


def want_cuda(torch):
    force = os.environ.get("FORCE_CUDA")
    if force is not None and force != "":
        return force == "1"
    return torch.version.cuda is not None and shutil.which("nvcc") is not None


def nvidia_wheel_dirs():
    """Include/lib folders of pip's nvidia packages (cusparse.h etc. live there)."""
    includes, libs = [], []
    for base in sys.path:
        for sub in sorted(glob.glob(os.path.join(base, "nvidia", "cu*"))):
            if os.path.isdir(os.path.join(sub, "include")):
                includes.append(os.path.join(sub, "include"))
            if os.path.isdir(os.path.join(sub, "lib")):
                libs.append(os.path.join(sub, "lib"))
    return includes, libs


def set_cuda_home():
    """Point CUDA_HOME at nvcc's real toolkit before torch.utils.cpp_extension reads it."""
    if os.environ.get("FORCE_CUDA") != "0" and "CUDA_HOME" not in os.environ:
        root = nvcc_toolkit_root()
        if root:
            os.environ["CUDA_HOME"] = root


def extensions():
    import torch
    from torch.utils.cpp_extension import CppExtension, CUDAExtension

    sources = ["csrc/bindings.cpp"] + sorted(glob.glob("csrc/cpu/*.cpp"))
    # -Wno-maybe-uninitialized: GCC 12 false positives inside its own avx512fintrin.h.
    # -g0 overrides the -g of Python's own CFLAGS: debug info for the per-ISA template
    # kernels was a third of their compile time (isa_base.cpp 343 -> 217 s on a 2-core
    # machine) and most of the module's size. EFFNET_DEBUG_INFO=1 keeps it.
    cxx = ["-O3", "-fopenmp", "-std=c++20", "-Wno-maybe-uninitialized"]
    if os.environ.get("EFFNET_DEBUG_INFO") != "1":
        cxx.append("-g0")
    define_macros = []
    if not want_cuda(torch):
        return [
            CppExtension(
                "effnet_kernels._C", sources, include_dirs=[os.path.join(ROOT, "csrc")],
                extra_compile_args={"cxx": cxx}, extra_link_args=["-fopenmp"],
            )
        ]
    if not torch.cuda.is_available() and not os.environ.get("TORCH_CUDA_ARCH_LIST"):
        os.environ["TORCH_CUDA_ARCH_LIST"] = DEFAULT_CUDA_ARCHS
    arch_list = os.environ.get("TORCH_CUDA_ARCH_LIST", "native")
    includes, libs = nvidia_wheel_dirs()
    sources += sorted(glob.glob("csrc/cuda/*.cu")) + sorted(glob.glob("csrc/cuda/*.cpp"))
    define_macros += [("EFFNET_WITH_CUDA", None), ("EFFNET_CUDA_ARCH_LIST", f'"{arch_list}"')]
    nvcc = ["-O3", "-std=c++20", "--use_fast_math", "-lineinfo", "--expt-relaxed-constexpr"]
    return [
        CUDAExtension(
            "effnet_kernels._C", sources,
            include_dirs=[os.path.join(ROOT, "csrc")] + includes,
            library_dirs=libs, define_macros=define_macros,
            extra_compile_args={"cxx": cxx, "nvcc": nvcc}, extra_link_args=["-fopenmp"],
        )
    ]


def main():
    set_cuda_home()
    from torch.utils.cpp_extension import BuildExtension

    setup(
        packages=find_packages(include=["effnet_kernels", "effnet_kernels.*"]),
        ext_modules=extensions(),
        cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
    )


if __name__ == "__main__":
    main()
