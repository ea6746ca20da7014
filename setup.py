"""Native extensions of the package (built by `pip install`, no manual step).

Project metadata lives in pyproject.toml; this file only declares compiled code:

- ``neo_common.host_kernel._native``, the CPU decode-attention kernel. The kernel source is compiled
  once per instruction set (AVX-512, AVX2, portable 16-lane vectors, scalar) inside the one extension
  and picked at run time, so a build works on any x86-64 host (and the portable parts on other
  architectures).
- ``neo_gpu_worker._quant_dense``, the CPU device's dense matmul over GGUF blocks (AVX2 + FMA + F16C,
  or scalar, picked at run time likewise).
"""
import os
import platform

from pybind11.setup_helpers import ParallelCompile, Pybind11Extension, build_ext
from setuptools import setup

CSRC = "services/common/host_kernel/csrc"
SOURCES = ["binding.cpp", "dispatch.cpp", "pool.cpp", "kernel_generic.cpp", "kernel_vec16.cpp"]
if platform.machine().lower() in ("x86_64", "amd64"):
    SOURCES += ["kernel_avx2.cpp", "kernel_avx512.cpp"]

# -O3 for the inner loops; no -march: the per-ISA units pick their own targets with
# `#pragma GCC target` and the dispatcher checks the CPU at run time. NEO_NATIVE_DEBUG=1 for -O0 -g.
if os.environ.get("NEO_NATIVE_DEBUG"):
    FLAGS = ["-O0", "-g"]
else:
    FLAGS = ["-O3", "-fno-math-errno", "-fno-trapping-math"]

ParallelCompile("NEO_BUILD_JOBS").install()  # compile the units in parallel (default: all CPUs)

ext = Pybind11Extension(
    "neo_common.host_kernel._native",
    [f"{CSRC}/{name}" for name in SOURCES],
    depends=[f"{CSRC}/{name}" for name in ("neo_attn.h", "isa.h", "simd.h", "kernel_impl.h", "pool.h")],
    include_dirs=[CSRC],
    cxx_std=20,
    extra_compile_args=FLAGS + ["-Wall", "-Wno-psabi"],
    extra_link_args=["-pthread"],
)

QD_CSRC = "services/gpu_worker/csrc"
quant_dense = Pybind11Extension(
    "neo_gpu_worker._quant_dense",
    [f"{QD_CSRC}/{name}" for name in ("qd_binding.cpp", "qd_pool.cpp", "qd_avx2.cpp", "qd_generic.cpp")],
    depends=[f"{QD_CSRC}/{name}" for name in ("quant_dense.h", "qd_impl.h", "qd_pool.h")],
    include_dirs=[QD_CSRC],
    cxx_std=20,
    # contraction off: each weight is d * q (+ m) rounded as the Python dequantizer rounds it; the
    # accumulation uses explicit fused multiply-adds
    extra_compile_args=FLAGS + ["-ffp-contract=off", "-Wall", "-Wno-psabi"],
    extra_link_args=["-pthread"],
)

setup(ext_modules=[ext, quant_dense], cmdclass={"build_ext": build_ext})
