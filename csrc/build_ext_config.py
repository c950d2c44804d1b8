"""Which C++/CUDA extension setup.py builds: MEGATRON_SPOT_EXT=auto|cuda|cpu|none.

- auto (default): the CUDA extension when torch has CUDA and nvcc is found, else the CPU
  extension, else (torch not importable at build time) nothing, with a warning.
- cuda / cpu: that extension or a loud error; never a silent fallback.
- none: no extension; megatron_spot.ops then uses its pure-PyTorch reference.

A compile error is always an error (set MEGATRON_SPOT_EXT=none to install without the extension).
The compiled module is `megatron_spot._C`; importing it registers torch.ops.megatron_spot.*.
Build with `pip install --no-deps --no-build-isolation -e .` after torch (see csrc/README.md).
"""
from __future__ import annotations

import glob
import os
import shutil
import sys

MODES = ("auto", "cuda", "cpu", "none")
EXT_NAME = "megatron_spot._C"
HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

CPU_SOURCES = ["csrc/spot_ops.cpp"]
CUDA_SOURCES = ["csrc/spot_ops_cuda.cpp", "csrc/spot_kernels.cu"]
CXX_FLAGS = ["-O3", "-fopenmp-simd", "-fno-trapping-math", "-Wno-unknown-pragmas"]  # no-trapping-math: lets the
# vectoriser if-convert the clamps of the polynomial exp (10x on AVX2)
NVCC_FLAGS = ["-O3", "-lineinfo", "--expt-relaxed-constexpr"]
DEFAULT_ARCHS = "8.0;9.0+PTX"


def _log(msg: str) -> None:
    print(f"megatron_spot build: {msg}", file=sys.stderr, flush=True)


def find_cuda_home() -> str | None:
    """The CUDA toolkit folder that holds include/cuda_runtime.h (not a wrapper script's folder)."""
    candidates = []
    if os.environ.get("CUDA_HOME"):
        candidates.append(os.environ["CUDA_HOME"])
    if os.environ.get("CUDA_PATH"):
        candidates.append(os.environ["CUDA_PATH"])
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
        try:  # a wrapper script such as `exec /usr/local/cuda-13.0/bin/nvcc "$@"`
            with open(nvcc, "rb") as f:
                head = f.read(4096)
            if head.startswith(b"#!"):
                for tok in head.decode("utf-8", "replace").split():
                    if tok.endswith("/bin/nvcc"):
                        candidates.append(os.path.dirname(os.path.dirname(tok)))
        except OSError:
            pass
    candidates += ["/usr/local/cuda"] + sorted(glob.glob("/usr/local/cuda-*"), reverse=True) + ["/opt/cuda"]
    for c in candidates:
        if c and os.path.isfile(os.path.join(c, "include", "cuda_runtime.h")) and os.path.isfile(
            os.path.join(c, "bin", "nvcc")
        ):
            return c
    return None


def _mode() -> str:
    mode = os.environ.get("MEGATRON_SPOT_EXT", "auto").strip().lower() or "auto"
    if mode not in MODES:
        raise SystemExit(f"MEGATRON_SPOT_EXT={mode!r} is not one of {', '.join(MODES)}")
    return mode


def extensions():
    """Return (ext_modules, cmdclass) for setup()."""
    mode = _mode()
    if mode == "none":
        _log("MEGATRON_SPOT_EXT=none: no extension; megatron_spot.ops will use the PyTorch reference")
        return [], {}
    try:
        import torch
    except ImportError as exc:
        if mode == "auto":
            _log(
                "torch is not importable at build time (build isolation? use "
                "`pip install --no-build-isolation`): building NO extension"
            )
            return [], {}
        raise SystemExit(
            f"MEGATRON_SPOT_EXT={mode} needs torch at build time ({exc}); install torch first and build "
            "with `pip install --no-deps --no-build-isolation -e .`"
        ) from exc

    cuda_home = find_cuda_home()
    torch_cuda = torch.version.cuda is not None
    if mode == "cuda":
        if not torch_cuda:
            raise SystemExit(
                f"MEGATRON_SPOT_EXT=cuda but torch {torch.__version__} has no CUDA support; install a CUDA torch "
                "or use MEGATRON_SPOT_EXT=cpu"
            )
        if cuda_home is None:
            raise SystemExit(
                "MEGATRON_SPOT_EXT=cuda but no CUDA toolkit (include/cuda_runtime.h + bin/nvcc) was found; "
                "set CUDA_HOME"
            )
    use_cuda = mode == "cuda" or (mode == "auto" and torch_cuda and cuda_home is not None)
    if use_cuda and not os.environ.get("CUDA_HOME"):
        # torch.utils.cpp_extension reads CUDA_HOME at import; its own guess from `which nvcc`
        # lands on a wrapper script's folder on some machines.
        os.environ["CUDA_HOME"] = cuda_home
    if use_cuda:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_ARCHS)

    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    include_dirs = [HERE]
    if use_cuda:
        ext = CUDAExtension(
            EXT_NAME,
            sources=CPU_SOURCES + CUDA_SOURCES,
            include_dirs=include_dirs,
            define_macros=[("SPOT_WITH_CUDA", "1")],
            extra_compile_args={"cxx": CXX_FLAGS, "nvcc": NVCC_FLAGS},
        )
        _log(
            f"building the CUDA extension (CUDA_HOME={os.environ['CUDA_HOME']}, "
            f"TORCH_CUDA_ARCH_LIST={os.environ['TORCH_CUDA_ARCH_LIST']})"
        )
    else:
        ext = CppExtension(
            EXT_NAME, sources=CPU_SOURCES, include_dirs=include_dirs, extra_compile_args={"cxx": CXX_FLAGS}
        )
        why = "MEGATRON_SPOT_EXT=cpu" if mode == "cpu" else (
            "torch has no CUDA" if not torch_cuda else "no CUDA toolkit found"
        )
        _log(f"building the CPU extension ({why})")
    return [ext], {"build_ext": BuildExtension.with_options(no_python_abi_suffix=False)}
