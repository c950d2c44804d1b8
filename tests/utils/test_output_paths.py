"""utils/output_paths.py: an output path is checked before the work, nothing is created by the check."""
import os

import pytest

from megatron_spot.utils.output_paths import OutputPathError, check_output_dir, check_output_file, check_output_prefix


def _listing(root):
    return sorted(os.path.relpath(os.path.join(d, f), root) for d, dirs, files in os.walk(root) for f in dirs + files)


def test_good_paths_pass_and_nothing_is_created(tree):
    before = _listing(tree)
    assert check_output_file(str(tree / "new" / "deeper" / "r.json"), "--json")
    assert check_output_file(str(tree / "afile"), "--json")  # replaced atomically
    assert check_output_prefix(str(tree / "adir" / "pairs"), "-o")
    assert check_output_dir(str(tree / "adir"), "--output")
    assert check_output_dir(str(tree / "new" / "run"), "--out", published_whole=True)
    assert _listing(tree) == before


@pytest.mark.parametrize("check,name,match", [
    (check_output_file, "adir", "is a folder; give a file name"),
    (check_output_file, "adir/", "is a folder"),
    (check_output_file, "afile/r.json", "afile is a file, not a folder"),
    (check_output_prefix, "adir/", r"is a folder, and a prefix names files .*adir/NAME\.bin"),
    (check_output_prefix, "adir", "is a folder"),
    (check_output_prefix, "afile/sub/pairs", "afile is a file, not a folder"),
    (check_output_dir, "afile", "exists and is not a folder"),
    (check_output_dir, "afile/run", "afile is a file, not a folder"),
])
def test_bad_paths_name_the_flag(tree, check, name, match):
    path = str(tree / name) + ("/" if name.endswith("/") else "")
    with pytest.raises(OutputPathError, match=match) as exc:
        check(path, "--flag")
    assert str(exc.value).startswith(f"--flag {path}")


def test_unwritable_folder_is_refused(read_only_dir):
    for check, path in ((check_output_file, os.path.join(read_only_dir, "r.json")),
                        (check_output_prefix, os.path.join(read_only_dir, "sub", "pairs")),
                        (check_output_dir, read_only_dir),
                        (check_output_dir, os.path.join(read_only_dir, "run"))):
        with pytest.raises(OutputPathError, match=f"cannot write in {read_only_dir}"):
            check(path, "--flag")
