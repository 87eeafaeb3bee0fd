"""Builds the C++ CPU attention kernel (pybind11, OpenMP where the compiler has it).

Everything else is declared in pyproject.toml. The extension does not link to torch:
it works on raw float buffers handed over from numpy views of CPU tensors.
"""

import os
import subprocess
import sys
import tempfile

from pybind11.setup_helpers import Pybind11Extension, build_ext
from setuptools import setup


def _compiler_accepts(flag: str) -> bool:
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "t.cpp")
        with open(src, "w") as f:
            f.write("int main() { return 0; }\n")
        cxx = os.environ.get("CXX", "c++")
        cmd = [cxx, flag, src, "-o", os.path.join(tmp, "t")]
        try:
            return subprocess.run(cmd, capture_output=True).returncode == 0
        except OSError:
            return False


compile_args, link_args = ["-O3"], []
if sys.platform != "win32":
    if _compiler_accepts("-fopenmp"):
        compile_args.append("-fopenmp")
        link_args.append("-fopenmp")
    if os.environ.get("MODEGPT_PORTABLE") != "1" and _compiler_accepts("-march=native"):
        compile_args.append("-march=native")

ext = Pybind11Extension(
    "modegpt_rt.kernels._cpu_attention",
    ["kernels/csrc/attention.cpp"],
    depends=["kernels/csrc/attention_core.h"],
    cxx_std=17,
    extra_compile_args=compile_args,
    extra_link_args=link_args,
)


class OptionalBuildExt(build_ext):
    """A missing compiler must not block installation: the runtime reports the
    missing extension and falls back to the torch reference."""

    def run(self):
        try:
            super().run()
        except Exception as e:  # noqa: BLE001 - any build failure
            print(f"WARNING: the C++ attention kernel was not built ({e}); the torch reference will be used")

    def build_extension(self, ext):
        try:
            super().build_extension(ext)
        except Exception as e:  # noqa: BLE001
            print(f"WARNING: building {ext.name} failed ({e}); the torch reference will be used")


linear_ext = Pybind11Extension(
    "modegpt_rt.kernels._cpu_linear",
    ["kernels/csrc/linear.cpp"],
    depends=["kernels/csrc/attention_core.h"],
    cxx_std=17,
    extra_compile_args=compile_args,
    extra_link_args=link_args,
)

setup(ext_modules=[ext, linear_ext], cmdclass={"build_ext": OptionalBuildExt})
