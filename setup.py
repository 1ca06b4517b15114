"""Builds ltg.py and its fused kernels, the `_ltg` extension (csrc/).

    pip install --no-build-isolation -e .      # torch must already be installed: it is imported here

The CPU kernels are always built; the CUDA kernels too when CUDA is usable (torch sees a GPU and a
toolkit is found) or when FORCE_CUDA=1 (to compile them on a machine without a GPU).
"""

import glob
import importlib.util
import os
import sys

import torch
from setuptools import setup
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension


def nvidia_dirs(sub):
    """The `sub` folders (include, lib) of the `nvidia` pip packages that torch's CUDA wheels install."""
    spec = importlib.util.find_spec("nvidia")
    if spec is None:
        return []
    return sorted(d for root in spec.submodule_search_locations for d in glob.glob(os.path.join(root, "*", sub)))


def link_torch_cudart(ext):
    """Link the CUDA runtime that torch loads, from the nvidia pip packages. CUDAExtension's
    -lcudart searches CUDA_HOME/lib64, which a wrong guess of CUDA_HOME misses (an nvcc wrapper in
    /usr/local/bin makes it /usr/local), and the packages ship only libcudart.so.<major>."""
    libs = sorted((f for d in nvidia_dirs("lib") for f in glob.glob(os.path.join(d, "libcudart.so.*"))), key=len)
    if libs:
        ext.libraries[ext.libraries.index("cudart")] = ":" + os.path.basename(libs[0])
        ext.library_dirs.append(os.path.dirname(libs[0]))
    return ext


def extension():
    with_cuda = os.environ.get("FORCE_CUDA") == "1" or (torch.cuda.is_available() and CUDA_HOME is not None)
    sources = ["csrc/ltg.cpp", "csrc/ltg_cpu.cpp"]
    # at::parallel_for is an inline OpenMP loop when ATen's backend is OpenMP: without -fopenmp it
    # runs on one thread. The runtime is the libgomp torch has already loaded. (Apple clang has no
    # -fopenmp.)
    openmp = ["-fopenmp"] if torch.backends.openmp.is_available() and sys.platform == "linux" else []
    cxx = ["-O3", *openmp]
    if not with_cuda:
        return CppExtension("_ltg", sources, extra_compile_args={"cxx": cxx}, extra_link_args=openmp)
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;8.6;8.9;9.0+PTX")
    # A CUDA toolkit may lack headers that torch's own headers include (e.g. cusparse.h): take them
    # from the nvidia pip packages, searched after the toolkit's own folders (-isystem, not -I).
    nvcc = ["-O3", *(flag for d in nvidia_dirs("include") for flag in ("-isystem", d))]
    return link_torch_cudart(CUDAExtension(
        "_ltg", [*sources, "csrc/ltg_cuda.cu"], define_macros=[("WITH_CUDA", None)],
        extra_compile_args={"cxx": cxx, "nvcc": nvcc}, extra_link_args=openmp))


setup(
    name="ltg",
    version="0.1.0",
    description="Longtail Guidance: diffusion guidance by predictive uncertainty, with fused kernels",
    py_modules=["ltg", "families"],
    # What `import ltg` needs, so that installing ltg into a project brings it; requirements.txt pins the
    # versions CI tests (the reproducible path).
    install_requires=["torch>=2.4", "diffusers>=0.42", "transformers>=4.46", "numpy>=1.24", "tqdm>=4.64"],
    ext_modules=[extension()],
    cmdclass={"build_ext": BuildExtension},
    python_requires=">=3.9",
)
