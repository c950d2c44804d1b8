"""Atomic publishing of outputs: build under a temporary sibling name, fsync, rename into place.

Every output megatron_spot writes (checkpoints, conversions, packs, sidecars, reports, configs) goes
through this module, so a crash, SIGKILL or Ctrl-C never leaves a half-written file or folder under
the final name: it is either the complete new output, the previous one, or absent.

Temporary names are ``<final>.tmp-<pid>-<8 hex>``. A run that was killed leaves such a temp behind;
the next publish of the same output removes temps of that pattern whose process is no longer alive
on this machine (never a live run's, never any other file).

Modes: temps are created with ``os.open(..., 0o666)`` / ``os.mkdir(..., 0o777)``, so the umask
applies exactly as for a plain ``open``/``mkdir``; ``tempfile.mkstemp``/``mkdtemp`` would create
them 0600/0700 and that mode would survive the rename.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import uuid
from typing import IO, Any, Iterator

_TMP_RE = re.compile(r"\.tmp-(\d+)-[0-9a-f]{8}(?:\..*)?$")


def temp_path(final: str, suffix: str = "") -> str:
    """A fresh sibling temp name of `final` (suffix keeps an extension tools look at, e.g. '.png')."""
    return f"{final}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}{suffix}"


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def remove_stale_temps(final: str) -> list[str]:
    """Remove `<final>.tmp-<pid>-<hex>*` left by processes that no longer run; returns what was removed."""
    final = os.path.abspath(final)
    parent, base = os.path.dirname(final), os.path.basename(final)
    removed = []
    try:
        names = os.listdir(parent)
    except OSError:
        return removed
    for name in names:
        if not name.startswith(base + ".tmp-"):
            continue
        m = _TMP_RE.match(name[len(base):])
        if m is None or _pid_alive(int(m.group(1))):
            continue
        path = os.path.join(parent, name)
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                os.remove(path)
        removed.append(path)
    return removed


def _fsync_path(path: str) -> None:
    """fsync a file or a folder by path; silently a no-op where it cannot be opened or synced."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def fsync_dir(path: str) -> None:
    """Make a rename inside `path` durable (no-op where directories cannot be opened)."""
    _fsync_path(path)


def _fsync_tree(path: str) -> None:
    for root, _dirs, files in os.walk(path):
        for name in files:
            _fsync_path(os.path.join(root, name))
        fsync_dir(root)


def makedirs_tracked(folder: str) -> list[str]:
    """os.makedirs(folder, exist_ok=True), returning the folders it created (outermost first), so that a
    run that fails can take them away again (remove_empty_dirs) and leave nothing behind."""
    missing = []
    path = os.path.abspath(folder)
    while not os.path.isdir(path) and os.path.dirname(path) != path:
        missing.append(path)
        path = os.path.dirname(path)
    os.makedirs(folder, exist_ok=True)
    return missing[::-1]


def remove_empty_dirs(folders: list[str]) -> None:
    """Remove these folders, innermost first, where they are (still) empty."""
    for path in reversed(folders):
        with contextlib.suppress(OSError):
            os.rmdir(path)


def make_temp_dir(final: str) -> str:
    """Create an empty temp folder beside `final` (umask-respecting mode), after removing stale ones."""
    final = os.path.abspath(final)
    os.makedirs(os.path.dirname(final), exist_ok=True)
    remove_stale_temps(final)
    tmp = temp_path(final)
    os.mkdir(tmp, 0o777)
    return tmp


def publish_dir(tmp: str, final: str, fsync: bool = True) -> None:
    """Rename the finished folder `tmp` to `final`, replacing an older `final` (moved aside first)."""
    final = os.path.abspath(final)
    if fsync:
        _fsync_tree(tmp)
    old = None
    if os.path.lexists(final):
        old = temp_path(final) + ".old"
        os.replace(final, old)
    os.replace(tmp, final)
    fsync_dir(os.path.dirname(final))
    if old is not None:
        if os.path.isdir(old) and not os.path.islink(old):
            shutil.rmtree(old, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                os.remove(old)


@contextlib.contextmanager
def atomic_dir(final: str) -> Iterator[str]:
    """`with atomic_dir(out) as tmp:` fill `tmp`; on success it becomes `out`, on error it is removed."""
    tmp = make_temp_dir(final)
    try:
        yield tmp
        publish_dir(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def publish_file(tmp: str, final: str) -> None:
    """fsync `tmp` and rename it to `final` (replacing it)."""
    fd = os.open(tmp, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, final)
    fsync_dir(os.path.dirname(os.path.abspath(final)))


def open_temp_file(final: str, binary: bool = False, suffix: str = "", encoding: str = "utf-8") -> tuple[str, IO]:
    """(temp path, open file) beside `final`, created with umask-respecting mode; stale temps removed."""
    final = os.path.abspath(final)
    os.makedirs(os.path.dirname(final), exist_ok=True)
    remove_stale_temps(final)
    tmp = temp_path(final, suffix)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    return tmp, (os.fdopen(fd, "wb") if binary else os.fdopen(fd, "w", encoding=encoding))


@contextlib.contextmanager
def atomic_file(final: str, binary: bool = False, suffix: str = "", encoding: str = "utf-8") -> Iterator[IO]:
    """`with atomic_file(path) as f:` write f; on success it replaces `path`, on error nothing changes."""
    tmp, f = open_temp_file(final, binary=binary, suffix=suffix, encoding=encoding)
    try:
        with f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, final)
        fsync_dir(os.path.dirname(os.path.abspath(final)))
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


def write_text_atomic(path: str, text: str) -> None:
    with atomic_file(path) as f:
        f.write(text)


def write_bytes_atomic(path: str, data: bytes) -> None:
    with atomic_file(path, binary=True) as f:
        f.write(data)


def write_json_atomic(path: str, obj: Any, indent: int = 2, **dump_kwargs) -> None:
    with atomic_file(path) as f:
        json.dump(obj, f, indent=indent, **dump_kwargs)
        f.write("\n")
