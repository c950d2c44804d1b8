"""megatron_spot.utils.atomic: all-or-nothing outputs, umask modes, stale temps of dead runs removed."""
import os
import subprocess
import sys

import pytest

from megatron_spot.utils import atomic


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def _dead_pid():
    """A pid that certainly ran and certainly ended: a child we waited for."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_file_is_all_or_nothing_with_normal_mode(tmp_path, umask_022):
    path = str(tmp_path / "out.json")
    atomic.write_json_atomic(path, {"a": 1})
    assert open(path).read() == '{\n  "a": 1\n}\n'
    assert os.stat(path).st_mode & 0o777 == 0o644
    with pytest.raises(RuntimeError):
        with atomic.atomic_file(path) as f:
            f.write("half of a new")
            raise RuntimeError("killed mid-write")
    assert open(path).read() == '{\n  "a": 1\n}\n'  # the old content survives
    assert os.listdir(tmp_path) == ["out.json"]  # and the temp is gone


def test_dir_is_published_whole_with_normal_mode(tmp_path, umask_022):
    final = str(tmp_path / "ckpt")
    with atomic.atomic_dir(final) as tmp:
        assert os.path.basename(tmp).startswith(f"ckpt.tmp-{os.getpid()}-")
        open(os.path.join(tmp, "w.bin"), "wb").write(b"x")
        assert not os.path.exists(final)
    assert os.stat(final).st_mode & 0o777 == 0o755
    with pytest.raises(KeyboardInterrupt):
        with atomic.atomic_dir(final) as tmp:
            open(os.path.join(tmp, "w.bin"), "wb").write(b"new")
            raise KeyboardInterrupt
    assert open(os.path.join(final, "w.bin"), "rb").read() == b"x"
    with atomic.atomic_dir(final) as tmp:  # replacing works and leaves nothing beside it
        open(os.path.join(tmp, "w.bin"), "wb").write(b"y")
    assert open(os.path.join(final, "w.bin"), "rb").read() == b"y"
    assert os.listdir(tmp_path) == ["ckpt"]


def test_only_our_own_stale_temps_of_dead_processes_are_removed(tmp_path):
    dead = _dead_pid()
    stale_dir = tmp_path / f"out.tmp-{dead}-0123abcd"
    stale_dir.mkdir()
    (stale_dir / "x").write_text("x")
    stale_file = tmp_path / f"out.tmp-{dead}-89abcdef.png"
    stale_file.write_text("x")
    live = tmp_path / f"out.tmp-{os.getppid()}-0123abcd"  # our parent: alive
    live.mkdir()
    unrelated = [tmp_path / "out.tmp", tmp_path / "out.tmp-notapid-0123abcd", tmp_path / f"other.tmp-{dead}-0123abcd",
                 tmp_path / "out.backup"]
    for p in unrelated:
        p.write_text("keep")
    atomic.write_text_atomic(str(tmp_path / "out"), "done")
    assert not stale_dir.exists() and not stale_file.exists()
    assert live.exists() and all(p.exists() for p in unrelated)
    assert (tmp_path / "out").read_text() == "done"


def test_makedirs_tracked_and_removed_again(tmp_path):
    from megatron_spot.utils.atomic import makedirs_tracked, remove_empty_dirs

    (tmp_path / "a").mkdir()
    created = makedirs_tracked(str(tmp_path / "a" / "b" / "c"))
    assert created == [str(tmp_path / "a" / "b"), str(tmp_path / "a" / "b" / "c")]
    assert makedirs_tracked(str(tmp_path / "a" / "b" / "c")) == []
    (tmp_path / "a" / "b" / "keep").write_text("x")  # a folder that is no longer empty stays
    remove_empty_dirs(created)
    assert sorted(os.listdir(tmp_path / "a")) == ["b"] and os.listdir(tmp_path / "a" / "b") == ["keep"]
