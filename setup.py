"""megatron_spot: Surgical Post-Training on Megatron-Core.

torch is deliberately NOT a build requirement (no pyproject.toml build-system table): an
isolated build would pull a CUDA torch onto a CPU box. Install torch first, then
`pip install --no-build-isolation -e .` (the Makefile does this).

The C++/CUDA extension is chosen by MEGATRON_SPOT_EXT=auto|cuda|cpu|none (see csrc/README.md).
"""
from setuptools import find_packages, setup


def _extension_build():
    """Return (ext_modules, cmdclass) for csrc/; the build logic lives in csrc/build_ext_config.py."""
    import os
    import sys

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "csrc"))
    try:
        import build_ext_config
    except ImportError:  # csrc/ not populated yet
        return [], {}
    finally:
        sys.path.pop(0)
    return build_ext_config.extensions()


ext_modules, cmdclass = _extension_build()

setup(
    name="megatron_spot",
    version="0.1.0",
    description="Surgical Post-Training (SPoT) backend on Megatron-Core",
    python_requires=">=3.10",
    packages=find_packages(include=["megatron_spot", "megatron_spot.*"]),
    package_data={"megatron_spot": ["**/*.yaml", "**/*.json", "**/*.txt"]},
    # torch and megatron-core are installed by the Makefile (or come with an NGC image); listing
    # them here would let pip replace an image's torch. See README.
    install_requires=[],
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    # Every console script points at a package-level `main`; tools/*.py are shims of the same.
    entry_points={
        "console_scripts": [
            "spot-train=megatron_spot.train:main",
            "spot-rectify=megatron_spot.cli.rectify:main",
            "spot-evaluate=megatron_spot.cli.evaluate:main",
            "spot-convert=megatron_spot.cli.convert_checkpoint:main",
            "spot-pack=megatron_spot.cli.pack_pairs:main",
            "spot-score=megatron_spot.cli.score_logprobs:main",
            "spot-profile=megatron_spot.cli.profile_throughput:main",
            "spot-export-quantized=megatron_spot.cli.export_quantized:main",
            "spot-gpu-check=megatron_spot.cli.gpu_check:main",
        ]
    },
)
