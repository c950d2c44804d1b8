"""tools/convert_checkpoint.py: a real subprocess run (spawn safety, exit codes, summary line, no
traceback on bad input) and the rest in-process through its main()."""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from tests.checkpoint import helpers

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TOOL = os.path.join(ROOT, "tools", "convert_checkpoint.py")


def _cli(*args):  # inherits this process's launcher variables (RANK, MASTER_PORT...): must still work
    return subprocess.run([sys.executable, TOOL, *args], capture_output=True, text=True, cwd=ROOT, timeout=300)


def _main():
    spec = importlib.util.spec_from_file_location("convert_checkpoint_tool", TOOL)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.main


@pytest.mark.slow
def test_cli_round_trip(ckpts, tmp_path):
    c = ckpts["tied"]
    mc, hf = str(tmp_path / "mc"), str(tmp_path / "hf")
    p = _cli("hf-to-mcore", "--hf", c["hf"], "--out", mc, "--dtype", "fp32", "--no-progress")
    assert p.returncode == 0, p.stderr
    assert "hf-to-mcore: 34 tensors" in p.stdout
    assert json.load(open(os.path.join(mc, "spot_checkpoint.json")))["dtype"] == "fp32"
    main = _main()
    assert main(["mcore-to-hf", "--ckpt", mc, "--out", hf, "--no-progress", "--max-shard-size", "300KB"]) == 0
    src, dst = helpers.read_hf_tensors(c["hf"]), helpers.read_hf_tensors(hf)
    assert set(src) == set(dst) and all(torch.equal(src[k], dst[k]) for k in src)
    assert os.path.isfile(os.path.join(hf, "model.safetensors.index.json"))
    # existing output: refused without --force, replaced with it
    assert main(["mcore-to-hf", "--ckpt", mc, "--out", hf, "--no-progress"]) == 2  # bad input (exit-code convention)
    assert main(["mcore-to-hf", "--ckpt", mc, "--out", hf, "--no-progress", "--force"]) == 0
    assert os.listdir(hf).count("model.safetensors") == 1


def test_cli_bad_input_one_line(ckpts, tmp_path):
    bad = str(tmp_path / "bad")
    shutil.copytree(ckpts["untied"]["hf"], bad)
    with open(os.path.join(bad, "model.safetensors"), "r+b") as f:
        f.truncate(1000)
    p = _cli("hf-to-mcore", "--hf", bad, "--out", str(tmp_path / "out"))
    assert p.returncode == 2
    assert "Traceback" not in p.stderr
    lines = [ln for ln in p.stderr.strip().splitlines() if "error" in ln]
    assert len(lines) == 1 and "corrupt safetensors file" in lines[0] and "model.safetensors" in lines[0], p.stderr
    assert not os.path.exists(str(tmp_path / "out"))


def test_cli_errors_in_process(ckpts, tmp_path, capsys):
    main = _main()
    assert main(["hf-to-mcore", "--hf", str(tmp_path / "nope"), "--out", str(tmp_path / "o")]) == 2
    assert "no such folder" in capsys.readouterr().err
    assert main(["mcore-to-hf", "--ckpt", ckpts["untied"]["hf"], "--out", str(tmp_path / "o")]) == 2
    assert "looks like a Hugging Face checkpoint" in capsys.readouterr().err
    bad = str(tmp_path / "bias")
    shutil.copytree(ckpts["untied"]["hf"], bad)
    cfg = json.load(open(os.path.join(bad, "config.json")))
    cfg["attention_bias"] = True
    json.dump(cfg, open(os.path.join(bad, "config.json"), "w"))
    assert main(["hf-to-mcore", "--hf", bad, "--out", str(tmp_path / "o")]) == 2
    assert "attention_bias=true is not supported" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        main(["hf-to-mcore", "--hf", bad, "--out", "x", "--dtype", "int8"])
    assert exc.value.code == 2
    assert not os.path.exists(str(tmp_path / "o"))
