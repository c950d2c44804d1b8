"""Checkpoints under attack and damage: planted pickles never run, corrupt files are one-line errors
naming the file, outputs never overwrite inputs, conversion keeps the source precision, outputs get
normal modes and stale temps of killed runs are removed."""
import os
import pickle
import shutil
import subprocess
import sys

import pytest
import torch

from megatron_spot.checkpoint import hf_convert as hc
from megatron_spot.checkpoint.errors import CheckpointError
from tests.checkpoint import helpers

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _copy(src, dst):
    shutil.copytree(src, dst)
    return str(dst)


def test_planted_metadata_pickle_never_runs(ckpts, tmp_path):
    from torch.distributed.checkpoint import FileSystemReader

    bad = _copy(ckpts["untied"]["mcore"], tmp_path / "planted")
    marker = str(tmp_path / "PWNED")
    with open(os.path.join(bad, ".metadata"), "wb") as f:
        pickle.dump(helpers.PlantedPickle(marker), f)
    assert pickle.loads(pickle.dumps(helpers.PlantedPickle(str(tmp_path / "selfcheck")))) is None  # the payload is live
    assert os.path.isdir(tmp_path / "selfcheck")
    out = str(tmp_path / "hf")
    with pytest.raises(CheckpointError, match=r"planted/\.metadata: refused to load.*posix\.mkdir"):
        hc.convert_mcore_to_hf(bad, out, progress=False)
    # torch's own reader, as Megatron-Core calls it on resume/scoring/export, is covered too
    with pytest.raises(Exception, match="not a checkpoint-metadata class"):
        FileSystemReader(bad).read_metadata()
    assert not os.path.exists(marker) and not os.path.exists(out)


def test_planted_object_in_a_shard_never_runs(tmp_path):
    """Non-tensor items of a .distcp (optimizer param groups, ...) load with weights_only=True."""
    import torch.distributed.checkpoint as dcp

    from megatron_spot.checkpoint.safe_load import load_failure_reason  # importing installs the allow-lists

    marker = str(tmp_path / "PWNED")
    folder = str(tmp_path / "ckpt")
    dcp.save({"w": torch.ones(3), "obj": helpers.PlantedPickle(marker)}, checkpoint_id=folder, no_dist=True)
    target = {"w": torch.zeros(3), "obj": None}
    with pytest.raises(BaseException) as exc:  # torch's CheckpointException is a BaseException
        dcp.load(target, checkpoint_id=folder, no_dist=True)
    reason = load_failure_reason(exc.value)  # what a one-line CheckpointError carries
    assert reason.startswith("UnpicklingError") and "posix.mkdir" in reason, reason
    assert not os.path.exists(marker)
    plain = str(tmp_path / "plain")  # a legitimate object (ints, strings, lists) still loads
    dcp.save({"w": torch.ones(3), "obj": {"lr": 1e-3, "betas": (0.9, 0.95), "params": [0, 1]}},
             checkpoint_id=plain, no_dist=True)
    target = {"w": torch.zeros(3), "obj": {"lr": 0.0, "betas": (0.0, 0.0), "params": [None, None]}}
    dcp.load(target, checkpoint_id=plain, no_dist=True)
    assert target["obj"]["betas"] == (0.9, 0.95) and torch.equal(target["w"], torch.ones(3))


def _cli(*args):
    return subprocess.run([sys.executable, os.path.join(ROOT, "tools", "convert_checkpoint.py"), *args,
                           "--no-progress"], capture_output=True, text=True, cwd=ROOT)


def test_corrupt_checkpoints_are_one_line_errors_naming_the_file(ckpts, tmp_path):
    src = ckpts["untied"]["mcore"]
    trunc = _copy(src, tmp_path / "trunc")
    shard = helpers.first_distcp(trunc)
    with open(shard, "r+b") as f:
        f.truncate(os.path.getsize(shard) // 2)
    garbage = _copy(src, tmp_path / "garbage")
    with open(os.path.join(garbage, ".metadata"), "wb") as f:
        f.write(b"\x80\x04not a pickle at all" * 10)
    cut = _copy(src, tmp_path / "cut")
    meta = os.path.join(cut, ".metadata")
    with open(meta, "r+b") as f:
        f.truncate(os.path.getsize(meta) // 3)
    cases = [(trunc, os.path.basename(shard), "truncated"), (garbage, ".metadata", "unreadable metadata"),
             (cut, ".metadata", "unreadable metadata")]
    for folder, name, why in cases:
        with pytest.raises(CheckpointError, match=why) as exc:
            hc.convert_mcore_to_hf(folder, str(tmp_path / "x"), progress=False)
        assert os.path.join(folder, name) in str(exc.value)
    # the CLI: exit 2 (bad input), one line naming the file, nothing written
    out = tmp_path / "out"
    proc = _cli("mcore-to-hf", "--ckpt", trunc, "--out", str(out))
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("convert_checkpoint ")]
    assert len(lines) == 1 and shard in lines[0] and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert not out.exists() and not [n for n in os.listdir(tmp_path) if ".tmp-" in n]


def test_output_that_is_contains_or_lies_inside_the_input_is_refused(ckpts, tmp_path):
    from tools.convert_checkpoint import main

    hf = _copy(ckpts["tied"]["hf"], tmp_path / "models" / "hf")
    before = sorted(os.listdir(hf))
    for out in (hf, str(tmp_path / "models"), os.path.join(hf, "sub")):
        assert main(["hf-to-mcore", "--hf", hf, "--out", out, "--force", "--no-progress"]) == 2
        assert sorted(os.listdir(hf)) == before  # nothing deleted, nothing added
    mc = ckpts["tied"]["mcore"]
    with pytest.raises(CheckpointError, match="is the input"):
        hc.convert_mcore_to_hf(mc, mc, progress=False, overwrite=True)
    assert os.path.isfile(os.path.join(mc, hc.METADATA_NAME))


def test_fp32_round_trip_is_bit_exact_by_default_with_normal_modes_and_no_stale_temps(ckpts, tmp_path, capsys):
    """hf-to-mcore keeps the source dtype unless told otherwise (and says when it changes it)."""
    c = ckpts["untied"]
    original = helpers.read_hf_tensors(c["hf"])
    assert {t.dtype for t in original.values()} == {torch.float32}
    mc, back = str(tmp_path / "mc"), str(tmp_path / "back")
    stale = tmp_path / "mc.tmp-999999999-deadbeef"  # left by a killed run (no such pid)
    stale.mkdir()
    (stale / "__0_0.distcp").write_bytes(b"half")
    live = tmp_path / f"mc.tmp-{os.getpid()}-0badf00d"  # a live process's temp is left alone
    live.mkdir()
    old_umask = os.umask(0o022)
    try:
        s = hc.convert_hf_to_mcore(c["hf"], mc, progress=False)
        hc.convert_mcore_to_hf(mc, back, progress=False)
    finally:
        os.umask(old_umask)
    assert s["dtype"] == s["source_dtype"] == "fp32"
    assert not stale.exists() and live.exists()
    exported = helpers.read_hf_tensors(back)
    assert set(exported) == set(original)
    for name, t in original.items():
        assert exported[name].dtype == torch.float32 and torch.equal(exported[name], t), name
    for folder in (mc, back):
        assert os.stat(folder).st_mode & 0o777 == 0o755  # not mkdtemp's 0700
        for name in os.listdir(folder):
            assert os.stat(os.path.join(folder, name)).st_mode & 0o777 == 0o644, name
    # an explicit --dtype that lowers the precision is announced
    s = hc.convert_hf_to_mcore(c["hf"], str(tmp_path / "mc16"), dtype="bf16", progress=True)
    assert s["dtype"] == "bf16" and s["source_dtype"] == "fp32"
    assert "storing the fp32 weights" in capsys.readouterr().out


def test_weights_fingerprint_follows_content_not_path(ckpts, tmp_path):
    from megatron_spot.checkpoint.fingerprint import weights_fingerprint

    a = weights_fingerprint(ckpts["untied"]["mcore"])
    assert weights_fingerprint(_copy(ckpts["untied"]["mcore"], tmp_path / "moved")) == a
    assert weights_fingerprint(ckpts["tied"]["mcore"]) != a
    edited = helpers.copy_with_other_weights(ckpts["untied"]["mcore"], str(tmp_path / "edited"))
    assert weights_fingerprint(edited) != a  # another model at the same size


def test_weights_fingerprint_equal_for_two_conversions_of_the_same_weights(ckpts, tmp_path):
    """torch_dist's .metadata holds a random save id and the temporary folder of each save: two
    conversions of one HF model (two folders, or again in place) must still get one fingerprint, so
    reference log-probs scored on one are accepted for the other."""
    from megatron_spot.checkpoint.fingerprint import weights_fingerprint

    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    hc.convert_hf_to_mcore(ckpts["untied"]["hf"], one, progress=False)
    hc.convert_hf_to_mcore(ckpts["untied"]["hf"], two, progress=False)
    with open(os.path.join(one, ".metadata"), "rb") as f, open(os.path.join(two, ".metadata"), "rb") as g:
        assert f.read() != g.read()  # the premise: the saves' metadata bytes differ
    a = weights_fingerprint(one)
    assert weights_fingerprint(two) == a
    hc.convert_hf_to_mcore(ckpts["untied"]["hf"], one, progress=False, overwrite=True)
    assert weights_fingerprint(one) == a
    other = str(tmp_path / "other")
    hc.convert_hf_to_mcore(ckpts["tied"]["hf"], other, progress=False)
    assert weights_fingerprint(other) != a


def _hf_with(src, dst, name, index, value):
    """A copy of HF folder `src` at `dst` whose tensor `name` holds `value` at `index`."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    path = os.path.join(dst, "model.safetensors")
    tensors = load_file(path)
    tensors[name][index] = value
    save_file(tensors, path, metadata={"format": "pt"})
    return str(dst)


@pytest.mark.parametrize("value,counts", [(float("nan"), "1 NaN and 0 Inf"), (float("-inf"), "0 NaN and 1 Inf")])
def test_non_finite_weights_are_refused_naming_the_tensor(ckpts, tmp_path, monkeypatch, value, counts):
    name = "model.layers.1.mlp.down_proj.weight"
    bad = _hf_with(ckpts["untied"]["hf"], tmp_path / "bad", name, (3, 7), value)
    with pytest.raises(CheckpointError, match=rf"tensor {name} holds {counts} values, the first at \[3, 7\]"):
        hc.convert_hf_to_mcore(bad, str(tmp_path / "mc"), progress=False)
    assert os.listdir(tmp_path) == ["bad"]  # no output, no temp folder
    # a Megatron checkpoint with the same damage (written with the check off): mcore-to-hf refuses it too
    real = hc.SafetensorsCheckpoint
    monkeypatch.setattr(hc, "SafetensorsCheckpoint", lambda folder, **_: real(folder))
    hc.convert_hf_to_mcore(bad, str(tmp_path / "mc"), progress=False)
    with pytest.raises(CheckpointError, match=rf"tensor decoder\.layers\.1\.mlp\.linear_fc2\.weight holds {counts}"):
        hc.convert_mcore_to_hf(str(tmp_path / "mc"), str(tmp_path / "hf"), progress=False)
    assert sorted(os.listdir(tmp_path)) == ["bad", "mc"]


def test_non_finite_check_in_row_blocks_names_the_row(tmp_path):
    """A large tensor is read in row blocks: the index reported is the row in the whole tensor."""
    from megatron_spot.checkpoint.finite import non_finite_problem

    t = torch.zeros(6, 4)
    assert non_finite_problem(t) is None
    t[4, 2] = float("inf")
    assert non_finite_problem(t[3:], first_row=3) == "0 NaN and 1 Inf values, the first at [4, 2]"
    big = torch.full((3,), 3e38)  # finite values whose float32 sum overflows: not refused
    assert non_finite_problem(big) is None
    assert non_finite_problem(torch.tensor([1, 2])) is None  # integer tensors hold no NaN


def test_existing_output_is_refused_before_the_model_loads(ckpts, tmp_path, monkeypatch):
    """mcore-to-hf used to find an existing output only when publishing, after loading the whole model."""
    def forbidden(*args, **kwargs):
        raise AssertionError("loaded the model before checking the output")

    monkeypatch.setattr(hc, "load_model_checkpoint", forbidden)
    monkeypatch.setattr(hc, "SafetensorsCheckpoint", forbidden)
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(CheckpointError, match="already exists and is not empty"):
        hc.convert_mcore_to_hf(ckpts["untied"]["mcore"], str(out), progress=False)
    with pytest.raises(CheckpointError, match="already exists and is not empty"):
        hc.convert_hf_to_mcore(ckpts["untied"]["hf"], str(out), progress=False)
    assert sorted(os.listdir(tmp_path)) == ["out"] and os.listdir(out) == ["keep.txt"]
