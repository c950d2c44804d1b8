import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


def _has_cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:
        return False


def pytest_collection_modifyitems(config, items):
    if _has_cuda():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU; run `pytest -m gpu` on a GPU machine")
    for item in items:
        # the marker, not item.keywords: keywords also hold folder names, and tests/gpu/ has CPU tests too
        if item.get_closest_marker("gpu") is not None:
            item.add_marker(skip_gpu)


@pytest.fixture
def tree(tmp_path):
    """A folder holding a file (afile) and a folder with one file (adir/inside): the things an output path
    can wrongly be (the output-path tests of utils/ and of every tool's flags)."""
    (tmp_path / "afile").write_text("x")
    (tmp_path / "adir").mkdir()
    (tmp_path / "adir" / "inside").write_text("y")
    return tmp_path


@pytest.fixture
def read_only_dir(tmp_path):
    """A folder nothing can be written in: a read-only tmpfs where this process may mount one (root: chmod
    does not stop root), a chmod 0500 folder for other users; removed after the test."""
    import subprocess

    folder = tmp_path / "read_only"
    folder.mkdir()
    if os.geteuid() != 0:
        folder.chmod(0o500)
        yield str(folder)
        folder.chmod(0o700)
        return
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(folder)],
                             capture_output=True).returncode == 0
    if not mounted:
        pytest.skip("running as root without the right to mount a read-only tmpfs")
    try:
        yield str(folder)
    finally:
        subprocess.run(["umount", str(folder)], capture_output=True)
