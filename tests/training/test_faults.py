"""Training under faults, in worlds of one process (no fault here needs more ranks): divergence never
poisons a checkpoint, resume refuses damaged or planted checkpoints with one line naming the file,
references belong to one model, bad settings fail in the preflight, metrics keep one row per step.

Each `python -m megatron_spot.train` run costs ~15-30 s here, so a few runs serve many checks.
"""
import json
import os
import pickle
import shutil
import subprocess
import sys

import pytest
import torch

from tests.checkpoint.helpers import PlantedPickle, copy_with_other_weights, first_distcp

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
_LAUNCHER = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def _env():
    env = {k: v for k, v in os.environ.items() if k not in _LAUNCHER}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    return env


def _overrides(ws, out, *extra):
    return [f"data.pack={ws['pack']}", f"model.init_checkpoint={ws['mcore']}", f"data.tokenizer={ws['hf']}",
            f"run.output_dir={out}", "data.micro_batch_size=2", "data.global_batch_size=8", "data.seq_length=128",
            "data.pad_to_multiple_of=8", "loss.beta=0.5", "optimizer.lr=2e-3", "optimizer.warmup_fraction=0",
            "run.epochs=1", "run.export_hf=false", "run.tensorboard=false", "precision.dtype=fp32", *extra]


def _train(ws, out, *extra, timeout=420):
    return subprocess.run([sys.executable, "-m", "megatron_spot.train", *_overrides(ws, out, *extra)],
                          capture_output=True, text=True, cwd=ROOT, env=_env(), timeout=timeout)


def _cfg(ws, out, *extra):
    from megatron_spot.config import TrainConfig, load_config

    return load_config(TrainConfig, None, _overrides(ws, out, *extra))


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    """Tiny HF Qwen3 + tokenizer, 32 packed pairs, its Megatron checkpoint, a copy of it with other
    weight bytes, and the first model's reference log-probs."""
    from tests.tiny import build_train_workspace, write_reference_sidecar

    # its own workspace, not the session's: the reference sidecar written below sits beside the pack
    ws = build_train_workspace(str(tmp_path_factory.mktemp("faults")))
    # "the checkpoint replaced in place": same files, names, sizes and tokenizer, other weight bytes
    ws["mcore_other"] = copy_with_other_weights(ws["mcore"], os.path.join(ws["root"], "mcore_other"))
    write_reference_sidecar(ws)
    return ws


def _read_model_finite(ckpt_model_dir, out_dir):
    """Export the checkpoint's model with mcore-to-hf and report whether every weight is finite."""
    from safetensors.torch import load_file

    from megatron_spot.checkpoint.hf_convert import convert_mcore_to_hf

    convert_mcore_to_hf(ckpt_model_dir, out_dir, progress=False)
    tensors = load_file(os.path.join(out_dir, "model.safetensors"))
    return all(bool(torch.isfinite(t).all()) for t in tensors.values()), len(tensors)


def test_divergence_stops_before_the_update_and_last_good_is_finite(ws, tmp_path):
    out = str(tmp_path / "run")
    proc = _train(ws, out, "optimizer.lr=1e6", "optimizer.clip_grad=0", "run.epochs=4", "run.save_interval=1")
    assert proc.returncode == 1, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    print(last)  # e.g. "error: the gradients are not finite at step 3 ... last good checkpoint is .../step_0000002"
    assert last.startswith("error: ") and "stopped before applying the update" in last, proc.stderr[-3000:]
    root = os.path.join(out, "checkpoints")
    latest = open(os.path.join(root, "latest")).read().strip()
    diverged_step = int(last.split(" at step ")[1].split()[0])
    assert diverged_step >= 2 and latest == f"step_{diverged_step - 1:07d}", (last, latest)
    assert os.path.join(root, latest) in last  # the message names the last good checkpoint
    assert sorted(n for n in os.listdir(root) if n.startswith("step_")) == \
        [f"step_{s:07d}" for s in range(1, diverged_step)]  # nothing saved at or after the bad step
    finite, n = _read_model_finite(os.path.join(root, latest, "model"), str(tmp_path / "hf"))
    assert finite and n > 10
    steps = [json.loads(line)["step"] for line in open(os.path.join(out, "metrics.jsonl"))]
    assert steps == list(range(1, diverged_step))


@pytest.fixture(scope="module")
def trained(ws, tmp_path_factory):
    """Three steps with a checkpoint each; then a resume from step 2 to step 4 in the same folder,
    resuming over a planted pickle where an older version kept RNG states."""
    out = str(tmp_path_factory.mktemp("resume") / "run")
    proc = _train(ws, out, "run.train_steps=3", "run.save_interval=1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    step2 = os.path.join(out, "checkpoints", "step_0000002")
    marker = os.path.join(os.path.dirname(out), "PWNED")
    torch.save(PlantedPickle(marker), os.path.join(step2, "rng", "rank_00000.pt"))
    resumed = _train(ws, out, "run.train_steps=4", "run.save_interval=1", f"run.load={step2}")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    return {"out": out, "marker": marker, "ckpt": os.path.join(out, "checkpoints", "step_0000003")}


def test_resume_keeps_one_metrics_row_per_step_and_stores_no_pickles(trained):
    rows = [json.loads(line) for line in open(os.path.join(trained["out"], "metrics.jsonl"))]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert not os.path.exists(trained["marker"])  # the planted rng/*.pt was never unpickled
    ckpt = os.path.join(trained["out"], "checkpoints", "step_0000004")
    assert os.listdir(os.path.join(ckpt, "rng")) == ["rank_00000.safetensors"]
    from safetensors import safe_open

    with safe_open(os.path.join(ckpt, "rng", "rank_00000.safetensors"), "pt") as f:
        assert json.loads(f.metadata()["python"])[0] == 3 and "torch" in f.keys()
    assert not [n for n in os.listdir(os.path.join(trained["out"], "checkpoints")) if ".tmp" in n]


def _damaged(trained, tmp_path, name, damage):
    ckpt = shutil.copytree(trained["ckpt"], str(tmp_path / name))
    return ckpt, damage(ckpt)


def _truncate(path):
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)
    return path


def _plant(path, marker):
    with open(path, "wb") as f:
        pickle.dump(PlantedPickle(marker), f)
    return path


def test_damaged_or_planted_checkpoints_are_refused_before_anything_starts(ws, trained, tmp_path, capsys):
    from megatron_spot.config import ConfigError
    from megatron_spot.train import main, preflight

    marker = str(tmp_path / "PWNED")
    cases = {
        "model_shard": lambda c: _truncate(first_distcp(os.path.join(c, "model"))),
        "optimizer_shard": lambda c: _truncate(first_distcp(os.path.join(c, "optimizer"))),
        "metadata": lambda c: _truncate(os.path.join(c, "model", ".metadata")),
        "trainer_state": lambda c: open(os.path.join(c, "trainer_state.json"), "w").write("{garbage") and
        os.path.join(c, "trainer_state.json"),
        "rng_state": lambda c: _truncate(os.path.join(c, "rng", "rank_00000.safetensors")),
        "planted_optimizer_metadata": lambda c: _plant(os.path.join(c, "optimizer", ".metadata"), marker),
    }
    for name, damage in cases.items():
        ckpt, bad_file = _damaged(trained, tmp_path, name, damage)
        with pytest.raises(ConfigError) as exc:
            preflight(_cfg(ws, str(tmp_path / "never"), f"run.load={ckpt}"), 1)
        assert bad_file in str(exc.value), (name, str(exc.value))
    assert not os.path.exists(marker)
    # the command line: one line, exit status 2 (bad input), no run folder written
    out = tmp_path / "never"
    assert main(_overrides(ws, str(out), f"run.load={tmp_path / 'model_shard'}")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "truncated" in err[0], err
    assert not out.exists()


def test_references_belong_to_one_model_and_tokenizer(ws, tmp_path):
    from megatron_spot.config import ConfigError
    from megatron_spot.data import PairDataset
    from megatron_spot.train import preflight
    from megatron_spot.training.reference import existing_sidecar, reference_identity

    preflight(_cfg(ws, str(tmp_path / "ok")), 1)  # the model the sidecar was scored with
    # another checkpoint (or the same path after replacing it): refused, naming what to rerun
    with pytest.raises(ConfigError, match="another reference model.*rerun tools/score_logprobs.py"):
        preflight(_cfg(ws, str(tmp_path / "x"), f"model.init_checkpoint={ws['mcore_other']}"), 1)
    ds = PairDataset(ws["pack"])
    moved = shutil.copytree(ws["mcore"], str(tmp_path / "moved"))  # same weights at another path: still valid
    assert existing_sidecar(ws["pack"], ds.fingerprint, moved, identity=reference_identity(moved, ds.tokenizer_hash))
    assert existing_sidecar(ws["pack"], ds.fingerprint, ws["mcore"],
                            identity=reference_identity(ws["mcore_other"], ds.tokenizer_hash)) is None
    # a truncated sidecar .npy is a preflight error, not a crash in the first step
    npy = str(tmp_path / "ref.npy")
    shutil.copy(ws["pack"] + ".ref_logps.npy", npy)
    shutil.copy(ws["pack"] + ".ref_logps.json", str(tmp_path / "ref.json"))
    _truncate(npy)
    with pytest.raises(ConfigError, match="ref.npy: unreadable reference log-probs"):
        preflight(_cfg(ws, str(tmp_path / "x"), f"data.ref_logprobs={npy}"), 1)


def test_scoring_refuses_an_unwritable_sidecar_before_it_scores(ws, tmp_path, monkeypatch, read_only_dir):
    """The sidecar used to be written after scoring every pair; a path nobody can write is now one line first."""
    import megatron_spot.platform as platform
    from megatron_spot.config import ConfigError
    from megatron_spot.training.reference import score_reference

    def forbidden(*args, **kwargs):
        raise AssertionError("scoring started before the sidecar path was checked")

    monkeypatch.setattr(platform, "initialize", forbidden)
    a_file = tmp_path / "file"
    a_file.write_text("x")
    for ref, message in ((f"{a_file}/ref.npy", "is a file, not a folder"),
                         (f"{read_only_dir}/ref.npy", f"cannot write in {read_only_dir}")):
        with pytest.raises(ConfigError, match=message) as exc:
            score_reference(_cfg(ws, str(tmp_path / "out"), f"data.ref_logprobs={ref}"), force=True, progress=False)
        assert str(exc.value).startswith(f"data.ref_logprobs {ref[:-4]}")
    assert os.listdir(read_only_dir) == []


def test_bad_settings_fail_in_the_preflight_with_one_line(ws, tmp_path):
    from megatron_spot.config import ConfigError
    from megatron_spot.data import TokenizerMismatchError
    from megatron_spot.train import preflight

    a_file = tmp_path / "file"
    a_file.write_text("x")
    other_tok = str(tmp_path / "other_tok")
    from megatron_spot.data import build_tiny_tokenizer

    build_tiny_tokenizer(other_tok, ["completely different words for another vocabulary"], vocab_size=300)
    cases = {
        "loss.objective=spot-bcoo": "loss.objective: unknown objective 'spot-bcoo'",
        "optimizer.lr=-1e-5": "optimizer.lr=-1e-05 must be positive",
        "data.global_batch_size=64": "data.global_batch_size=64 is larger than the 32 pairs",
        f"run.output_dir={a_file}/run": "is not writable",
        f"data.tokenizer={other_tok}": "is not the tokenizer stored with the checkpoint",
    }
    for override, message in cases.items():
        with pytest.raises((ConfigError, TokenizerMismatchError)) as exc:  # main() exits 2 on either
            preflight(_cfg(ws, str(tmp_path / "out"), override), 1)
        assert message in str(exc.value) and "\n" not in str(exc.value), (override, str(exc.value))
    assert not (tmp_path / "out").exists()


def _folder_bytes(path):
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)


@pytest.fixture
def small_filesystem(tmp_path):
    """A tmpfs of its own, mounted by the test (needs root and mount(2)) and removed after."""
    mnt = tmp_path / "fs"
    mnt.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(mnt)], capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.strip()}")

    def resize(size_bytes):
        subprocess.run(["mount", "-o", f"remount,size={size_bytes}", str(mnt)], check=True)

    try:
        yield mnt, resize
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


@pytest.mark.slow
def test_a_save_onto_a_full_filesystem_keeps_the_last_good_checkpoint(ws, small_filesystem, tmp_path):
    from megatron_spot.checkpoint.training_state import verify_training_checkpoint

    mnt, resize = small_filesystem
    out = str(mnt / "run")
    first = _train(ws, out, "run.train_steps=1", "run.load=auto")  # one checkpoint, step_0000001
    assert first.returncode == 0, first.stderr[-3000:]
    root = os.path.join(out, "checkpoints")
    good = os.path.join(root, "step_0000001")
    checkpoint_bytes = _folder_bytes(good)
    # room for everything there is plus half a checkpoint: the next save runs out of space part-way
    st = os.statvfs(mnt)
    used = (st.f_blocks - st.f_bfree) * st.f_frsize
    resize(used + checkpoint_bytes // 2)
    second = _train(ws, out, "run.train_steps=2", "run.load=auto")  # resumes at step 1, saves step 2
    assert second.returncode == 1, second.stderr[-3000:]
    last = second.stderr.strip().splitlines()[-1]
    print(last)
    assert last.startswith("error: checkpoint ") and "step_0000002 not saved" in last, second.stderr[-3000:]
    assert "No space left on device" in last and f"the last good checkpoint is still {good}" in last, last
    assert open(os.path.join(root, "latest")).read().strip() == "step_0000001"
    assert sorted(os.listdir(root)) == ["latest", "step_0000001"]  # no step_0000002, no temp left
    # the last good checkpoint is complete and loads: its files check out, its model converts to HF
    assert verify_training_checkpoint(good)["step"] == 1
    finite, n = _read_model_finite(os.path.join(good, "model"), str(tmp_path / "hf"))
    assert finite and n > 10


def test_run_load_auto_resumes_the_newest_complete_checkpoint_or_starts_fresh(tmp_path):
    from megatron_spot.config import ConfigError, TrainConfig, load_config
    from megatron_spot.train import _check_run, _checkpoint_to_resume

    def resume_of(out, *extra):
        return _checkpoint_to_resume(load_config(TrainConfig, None, [f"run.output_dir={out}", "run.load=auto", *extra]))

    out = tmp_path / "run"
    assert resume_of(out) is None  # no folder yet: a fresh start
    root = out / "checkpoints"
    for step in (1, 2):
        (root / f"step_{step:07d}").mkdir(parents=True)
        (root / f"step_{step:07d}" / "trainer_state.json").write_text("{}")
    (root / "step_0000003.tmp-99999999-0123abcd").mkdir()  # a save that died half-way
    assert resume_of(out) is None  # no `latest` yet: nothing was ever published
    (root / "latest").write_text("step_0000002")
    assert resume_of(out) == str(root / "step_0000002")
    (root / "latest").write_text("step_0000007")  # names a checkpoint that is not there
    with pytest.raises(ConfigError, match="latest names a checkpoint that is missing or incomplete"):
        resume_of(out)
    for bad, message in (("run.collective_timeout_s=0", "must be positive"),
                         ("run.step_timeout_s=-1", "must not be negative")):
        with pytest.raises(ConfigError, match=message):
            _check_run(load_config(TrainConfig, None, [bad]))


def test_test_fault_specs_are_parsed_strictly():
    import signal

    from megatron_spot.training.fault_injection import parse_fault

    assert parse_fault("SIGKILL:rank=1:step=3") == (signal.SIGKILL, 1, 3, 0)
    assert parse_fault("sigstop:rank=0:step=2:attempt=1") == (signal.SIGSTOP, 0, 2, 1)
    for bad in ("SIGKILL:rank=1", "SIGNOPE:rank=1:step=3", "SIGKILL:rank=x:step=3", "SIGKILL:rank=1:step=3:when=now"):
        with pytest.raises(ValueError, match="MEGATRON_SPOT_TEST_FAULT"):
            parse_fault(bad)


def test_a_checkpoint_folder_that_cannot_be_created_fails_the_save_with_one_line(tmp_path):
    """The unwritable-folder case (as root, modes do not stop writes: a file stands where the checkpoints
    folder goes): CheckpointSaveError naming the path, before any rank writes anything."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "checkpoints").write_text("a file, not a folder")
    child = (
        "import sys, torch.distributed as dist\n"
        "from megatron_spot.checkpoint.errors import CheckpointSaveError\n"
        "from megatron_spot.checkpoint.training_state import save_training_checkpoint\n"
        "dist.init_process_group('gloo', init_method='tcp://127.0.0.1:%d' % int(sys.argv[2]), rank=0, world_size=1)\n"
        "try:\n"
        "    save_training_checkpoint(sys.argv[1], 5, engine=None, trainer_state={})\n"
        "except CheckpointSaveError as exc:\n"
        "    print(exc)\n")
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.run([sys.executable, "-c", child, str(run_dir), str(port)], capture_output=True, text=True,
                          cwd=ROOT, env=_env(), timeout=300)
    out = proc.stdout.strip().splitlines()
    assert proc.returncode == 0 and len(out) == 1, proc.stderr[-3000:]
    assert out[0].startswith(f"checkpoint {run_dir}/checkpoints/step_0000005 not saved (") and \
        "the last good checkpoint is still none" in out[0], out[0]
    assert (run_dir / "checkpoints").read_text() == "a file, not a folder"
