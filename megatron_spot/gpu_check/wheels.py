"""The carried wheels: download them (`make gpu-wheels`, with a registry), find them, build the dry
run's probe wheel, and install a wheel without pip. Standard library only."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile

from megatron_spot.gpu_check.plan import WHEEL_PLATFORMS, WHEEL_PYTHON, WHEELS, WHEELS_BUDGET_BYTES

PROBE_WHEEL = "gpu_check_probe-1.0-py3-none-any.whl"


def wheel_files(folder: str) -> dict[str, str]:
    """Distribution name -> wheel path for the pinned WHEELS found in `folder`."""
    found = {}
    if not os.path.isdir(folder):
        return found
    for dist, version, _ in WHEELS:
        stem = dist.replace("-", "_").lower()
        for f in sorted(os.listdir(folder)):
            parts = f.lower().split("-")
            if f.endswith(".whl") and len(parts) > 2 and parts[0] == stem and parts[1] == version:
                found[dist] = os.path.join(folder, f)
    return found


def missing_wheels(folder: str) -> list[str]:
    """`dist==version` of every pinned wheel this interpreter lacks and `folder` does not hold: the GPU
    run cannot pass without them, so the parent refuses to start (a wasted run costs the GPU lease)."""
    import importlib.metadata as md

    files = wheel_files(folder)
    missing = []
    for dist, version, _ in WHEELS:
        try:
            md.version(dist)
        except md.PackageNotFoundError:
            if dist not in files:
                missing.append(f"{dist}=={version}")
    return missing


def download_wheels(dest: str) -> int:
    """`make gpu-wheels`: fetch the cp312 manylinux wheels of WHEELS (no dependencies) into `dest`."""
    os.makedirs(dest, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--only-binary=:all:", "--python-version", WHEEL_PYTHON,
           "--implementation", "cp", "--no-deps", "-d", dest, "-q"]
    for p in WHEEL_PLATFORMS:
        cmd += ["--platform", p]
    cmd += [f"{d}=={v}" for d, v, _ in WHEELS]
    print("+ " + " ".join(cmd), flush=True)
    if subprocess.run(cmd).returncode != 0:
        print("error: pip download failed (see above)", file=sys.stderr)
        return 1
    files = wheel_files(dest)
    missing = [d for d, _, _ in WHEELS if d not in files]
    if missing:
        print(f"error: {dest}: no wheel for {', '.join(missing)} after download", file=sys.stderr)
        return 1
    total = sum(os.path.getsize(p) for p in files.values())
    for p in files.values():
        print(f"  {os.path.basename(p)}  {os.path.getsize(p) / 1e6:.2f} MB")
    print(f"{dest}: {len(files)} wheels, {total / 1e6:.2f} MB in all (budget {WHEELS_BUDGET_BYTES / 1e6:.0f} MB)")
    if total > WHEELS_BUDGET_BYTES:
        print(f"error: {dest}: {total / 1e6:.1f} MB exceeds the {WHEELS_BUDGET_BYTES / 1e6:.0f} MB budget",
              file=sys.stderr)
        return 1
    return 0


def make_probe_wheel(folder: str) -> str:
    """A tiny pure-Python wheel: the dry run installs it through the same path as the real wheels."""
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, PROBE_WHEEL)
    files = {
        "gpu_check_probe/__init__.py": "ANSWER = 42\n",
        "gpu_check_probe-1.0.dist-info/METADATA": "Metadata-Version: 2.1\nName: gpu-check-probe\nVersion: 1.0\n",
        "gpu_check_probe-1.0.dist-info/WHEEL": "Wheel-Version: 1.0\nGenerator: gpu_check\nRoot-Is-Purelib: true\n"
                                                "Tag: py3-none-any\n",
    }
    record = "".join(f"{k},,\n" for k in files) + "gpu_check_probe-1.0.dist-info/RECORD,,\n"
    with zipfile.ZipFile(path, "w") as z:
        for k, v in files.items():
            z.writestr(k, v)
        z.writestr("gpu_check_probe-1.0.dist-info/RECORD", record)
    return path


def extract_wheel(wheel: str, target: str) -> None:
    """Install a wheel without pip: its files into `target`, `*.data/{purelib,platlib}` merged in,
    `*.data/scripts` into target/bin (executable), as pip --target does for the pinned wheels (ninja
    ships its binary as such a script; none of them needs a generated console-script wrapper)."""
    with zipfile.ZipFile(wheel) as z:
        for info in z.infolist():
            parts = info.filename.split("/")
            if parts[0].endswith(".data") and len(parts) > 2:
                kind, rest = parts[1], parts[2:]
                dest = os.path.join(target, "bin", *rest) if kind == "scripts" else os.path.join(target, *rest)
            else:
                dest = os.path.join(target, *parts)
            if info.is_dir():
                os.makedirs(dest, exist_ok=True)
                continue
            os.makedirs(os.path.dirname(dest), exist_ok=True)
            with z.open(info) as src, open(dest, "wb") as out:
                shutil.copyfileobj(src, out)
            mode = (info.external_attr >> 16) & 0o777
            if "/bin/" in dest:  # executables (ninja) may come without mode bits from some zip writers
                mode |= 0o755
            if mode:
                os.chmod(dest, mode)
