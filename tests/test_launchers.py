"""The launch scripts of examples/, run with stub `srun`, `scontrol`, `torchrun` and `nvidia-smi` on PATH
that record what they were asked to do: nodes, ranks per node, rendezvous address and port, restart flags,
run.load=auto, and the user's overrides passed through unchanged (also with spaces)."""
import json
import os
import stat
import subprocess

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_RECORDER = """#!/usr/bin/env python3
import json, os, sys
with open(os.environ["STUB_LOG"], "a") as f:
    f.write(json.dumps({"tool": os.path.basename(sys.argv[0]), "argv": sys.argv[1:],
                        "env": {k: v for k, v in os.environ.items()
                                if k.startswith(("TORCH_", "OMP_", "CUDA_", "MASTER_"))}}) + "\\n")
"""
_SCONTROL = """#!/usr/bin/env bash
# `scontrol show hostnames node[017-018]` -> one host per line (the only use the script makes of it)
[ "$1 $2" = "show hostnames" ] || exit 9
python3 - "$3" <<'PY'
import re, sys
m = re.fullmatch(r"(\\w+?)\\[(\\d+)-(\\d+)\\]", sys.argv[1])
width = len(m.group(2))
print("\\n".join(f"{m.group(1)}{i:0{width}d}" for i in range(int(m.group(2)), int(m.group(3)) + 1)))
PY
"""


def _stubs(tmp_path, *names, nvidia_gpus=None):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name in names:
        (bin_dir / name).write_text(_SCONTROL if name == "scontrol" else _RECORDER)
    if nvidia_gpus is not None:
        (bin_dir / "nvidia-smi").write_text("#!/usr/bin/env bash\n" + "".join(
            f"echo 'GPU {i}: stub'\n" for i in range(nvidia_gpus)))
    for p in bin_dir.iterdir():
        p.chmod(p.stat().st_mode | stat.S_IXUSR)
    return str(bin_dir)


def _run(script, args, env, bin_dir, log):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "MASTER_", "GPUS_", "NPROC",
                                                                      "MAX_RESTARTS"))} | env
    env.update(PATH=f"{bin_dir}:{os.environ['PATH']}", STUB_LOG=str(log))
    proc = subprocess.run(["bash", os.path.join(ROOT, "examples", script), *args], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return [json.loads(line) for line in log.read_text().splitlines()]


def test_slurm_script_launches_one_agent_per_node_with_c10d_rendezvous_and_restarts(tmp_path):
    bin_dir = _stubs(tmp_path, "srun", "scontrol")
    override = "data.pack=/data/my pairs/pack"  # a space must survive the script's quoting
    job = {"SLURM_JOB_NODELIST": "node[017-020]", "SLURM_NNODES": "4", "SLURM_JOB_ID": "7654321",
           "SLURM_GPUS_ON_NODE": "8"}
    calls = _run("slurm_spot.sbatch", ["recipe.yaml", override, "run.train_steps=5"], job, bin_dir,
                 tmp_path / "log.jsonl")
    assert [c["tool"] for c in calls] == ["srun", "srun"]  # scoring, then training
    port = 20000 + 7654321 % 20000  # the script's rule: one port per job id
    launch = ["--kill-on-bad-exit=1", "torchrun", "--nnodes", "4", "--nproc-per-node", "8", "--rdzv-backend", "c10d",
              "--rdzv-endpoint", f"node017:{port}", "--rdzv-id", "7654321"]
    assert calls[0]["argv"] == launch + ["tools/score_logprobs.py", "--config", "recipe.yaml", override,
                                         "run.train_steps=5"]
    assert calls[1]["argv"] == launch + ["--max-restarts", "3", "-m", "megatron_spot.train", "--config", "recipe.yaml",
                                         "run.load=auto", override, "run.train_steps=5"]
    assert calls[1]["env"]["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] == "1"

    # the user's settings win: port, GPUs per node, restarts; another node list and node count
    (tmp_path / "log2.jsonl").touch()
    job.update(SLURM_JOB_NODELIST="gpu[3-4]", SLURM_NNODES="2", MASTER_PORT="31000", GPUS_PER_NODE="4",
               MAX_RESTARTS="0")
    train = _run("slurm_spot.sbatch", ["recipe.yaml"], job, bin_dir, tmp_path / "log2.jsonl")[1]["argv"]
    assert train[:train.index("-m")] == ["--kill-on-bad-exit=1", "torchrun", "--nnodes", "2", "--nproc-per-node", "4",
                                         "--rdzv-backend", "c10d", "--rdzv-endpoint", "gpu3:31000", "--rdzv-id",
                                         "7654321", "--max-restarts", "0"]


def test_single_node_script_restarts_with_run_load_auto(tmp_path):
    bin_dir = _stubs(tmp_path, "torchrun", nvidia_gpus=2)
    calls = _run("launch_single_node.sh", ["recipe.yaml", "run.train_steps=5"], {}, bin_dir, tmp_path / "log.jsonl")
    assert [c["argv"] for c in calls] == [
        ["--standalone", "--nproc-per-node", "2", "tools/score_logprobs.py", "--config", "recipe.yaml",
         "run.train_steps=5"],
        ["--standalone", "--nproc-per-node", "2", "--max-restarts", "3", "-m", "megatron_spot.train", "--config",
         "recipe.yaml", "run.load=auto", "run.train_steps=5"]]
    assert calls[1]["env"]["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] == "1"
