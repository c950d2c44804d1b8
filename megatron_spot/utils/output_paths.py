"""Check an output path before the work that fills it starts, so a tool fails in its first second with one
line naming the flag and the path, not after an hour of work (or with a hidden `dir/.bin`).

Nothing is created: a folder that does not exist yet must lie under an existing, writable folder, where
the tool will create it. Writability is probed by creating and removing a uniquely named empty file
(os.access says yes for root on a read-only mount and for ACL'd folders it cannot judge).
"""
from __future__ import annotations

import os
import uuid


class OutputPathError(ValueError):
    """An output path that cannot be written; the message names the flag and the path."""


def _nearest_existing(path: str) -> str:
    path = os.path.abspath(path)
    while not os.path.lexists(path):
        parent = os.path.dirname(path)
        if parent == path:
            break
        path = parent
    return path


def _probe_writable(folder: str, what: str, path: str) -> None:
    probe = os.path.join(folder, f".write-probe-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except OSError as exc:
        raise OutputPathError(f"{what} {path}: cannot write in {folder} ({exc.strerror or exc})") from None
    os.close(fd)
    os.remove(probe)


def _check_parent(path: str, what: str) -> None:
    """The folder `path` goes into exists and is writable, or can be created under one that is."""
    parent = os.path.dirname(os.path.abspath(path))
    base = _nearest_existing(parent)
    if not os.path.isdir(base):
        raise OutputPathError(f"{what} {path}: {base} is a file, not a folder")
    _probe_writable(base, what, path)


def check_output_file(path: str, what: str) -> str:
    """`path` can be written as a file (e.g. --json report.json). Returns it."""
    if not path:
        raise OutputPathError(f"{what}: empty path")
    if path.endswith(os.sep) or os.path.isdir(path):
        raise OutputPathError(f"{what} {path}: is a folder; give a file name")
    _check_parent(path, what)
    if os.path.lexists(path) and not os.path.isfile(path):
        raise OutputPathError(f"{what} {path}: exists and is not a regular file")
    return path


def check_output_prefix(prefix: str, what: str, example_suffix: str = ".bin") -> str:
    """`prefix` names files `prefix<suffix>` (e.g. -o data/pairs -> data/pairs.bin): a bare folder
    (`dir/`, or an existing folder) would write hidden files `dir/.bin`. Returns it."""
    if not prefix:
        raise OutputPathError(f"{what}: empty prefix")
    if prefix.endswith(os.sep) or os.path.isdir(prefix) or os.path.basename(prefix) in (".", ".."):
        raise OutputPathError(f"{what} {prefix}: is a folder, and a prefix names files ({prefix.rstrip(os.sep)}/NAME "
                              f"writes {prefix.rstrip(os.sep)}/NAME{example_suffix}); add a file name")
    _check_parent(prefix, what)
    return prefix


def check_output_dir(path: str, what: str, published_whole: bool = False) -> str:
    """`path` is or can become a folder this process writes in. published_whole: the folder is built
    under a temporary sibling name and renamed into place (utils/atomic.atomic_dir), so its parent
    must be writable too. Returns `path`."""
    if not path:
        raise OutputPathError(f"{what}: empty path")
    if os.path.lexists(path) and not os.path.isdir(path):
        raise OutputPathError(f"{what} {path}: exists and is not a folder")
    if os.path.isdir(path) and not published_whole:
        _probe_writable(path, what, path)
        return path
    _check_parent(path.rstrip(os.sep) or os.sep, what)
    return path
