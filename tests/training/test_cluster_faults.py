"""A job of 4 ranks (TP2 x DP2, gloo) under torchrun when a rank dies or hangs, and across two "nodes":

- a rank SIGKILLed in the middle of step 3 under `torchrun --max-restarts 1` with run.load=auto: the job
  restarts by itself and its per-step losses equal an uninterrupted run's, bit for bit;
- two torchrun agents (`--nnodes 2`, c10d rendezvous on 127.0.0.1, 2 ranks each: TP inside a node, DP
  across) train with the same losses as one 4-rank agent; a rank of the second node SIGKILLed mid-step
  then ends every process, on both nodes, non-zero within run.collective_timeout_s + 30 s;
- a rank SIGSTOPped mid-step: the others' step watchdog ends the job within run.step_timeout_s (plus
  torchrun's 30 s SIGTERM grace for the stopped process), with stacks and a line naming the stopped rank.

Faults are injected with MEGATRON_SPOT_TEST_FAULT (megatron_spot/training/fault_injection.py). Each
torchrun costs ~30 s here; every process a test starts is in its own session, killed at the end.
"""
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import uuid

import psutil
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
STEPS = 3
COLLECTIVE_TIMEOUT_S = 20
_LAUNCHER = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")

pytestmark = pytest.mark.slow


def _overrides(ws, out, *extra):
    return [f"data.pack={ws['pack']}", f"model.init_checkpoint={ws['mcore']}", f"data.tokenizer={ws['hf']}",
            f"run.output_dir={out}", "parallel.tensor_parallel=2", "data.micro_batch_size=2",
            "data.global_batch_size=8", "data.seq_length=128", "data.pad_to_multiple_of=8", "loss.beta=0.5",
            "optimizer.lr=2e-3", "optimizer.warmup_fraction=0", "run.epochs=1", f"run.train_steps={STEPS}",
            "run.export_hf=false", "run.tensorboard=false", "precision.dtype=fp32",
            f"run.collective_timeout_s={COLLECTIVE_TIMEOUT_S}", *extra]


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Job:
    """torchrun agents started in their own sessions; stop() kills whatever of them is left, including
    processes their ranks left behind: torchrun puts each rank in a session of its own, and Megatron-Core's
    checkpoint writer starts a multiprocessing Manager process per rank that outlives a SIGKILLed rank. All
    carry this job's tag in their environment."""

    def __init__(self, log_dir):
        self.log_dir, self.agents, self.logs = log_dir, [], []
        self.tag = uuid.uuid4().hex

    def start(self, ws, out, nproc, torchrun_args, extra=(), fault=None, fresh_store_per_attempt=False):
        env = {k: v for k, v in os.environ.items() if k not in _LAUNCHER + (
            "MEGATRON_SPOT_TEST_FAULT", "TORCH_DISABLE_SHARE_RDZV_TCP_STORE")}
        env.update(OMP_NUM_THREADS="1", PYTHONPATH=ROOT, MEGATRON_SPOT_TEST_JOB=self.tag)
        if fresh_store_per_attempt:  # what the examples/ launchers set for restarts (see README); without
            # restarts the agent's own store avoids its one race: the port it picks for rank 0's store
            # can be taken by another process before rank 0 binds it (seen on this shared box: EADDRINUSE)
            env["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] = "1"
        if fault:
            env["MEGATRON_SPOT_TEST_FAULT"] = fault
        log = os.path.join(self.log_dir, f"agent{len(self.agents)}.log")
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}", *torchrun_args,
               "-m", "megatron_spot.train", *_overrides(ws, out, *extra)]
        with open(log, "w") as f:
            self.agents.append(subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT,
                                                start_new_session=True))
        self.logs.append(log)
        return self.agents[-1]

    def workers(self, count, timeout=120):
        """{global rank: psutil.Process} of the agents' workers, once `count` of them run."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            found = {}
            for agent in self.agents:
                try:
                    for child in psutil.Process(agent.pid).children():
                        found[int(child.environ()["RANK"])] = child
                except (psutil.Error, KeyError):
                    continue
            if len(found) == count:
                return found
            assert all(a.poll() is None for a in self.agents), self.output()
            time.sleep(0.2)
        raise AssertionError(f"{count} workers did not start in {timeout} s\n{self.output()}")

    def wait(self, timeout):
        deadline = time.time() + timeout
        for agent in self.agents:
            agent.wait(timeout=max(1, deadline - time.time()))
        return [a.returncode for a in self.agents]

    def output(self, tail=6000):
        """The agents' logs (each cut to its last `tail` characters; None: whole)."""
        return "\n".join(f"--- {log} ---\n{open(log, errors='replace').read()[-tail if tail else 0:]}"
                         for log in self.logs)

    def stop(self):
        for proc in psutil.process_iter():
            try:
                if proc.pid != os.getpid() and proc.environ().get("MEGATRON_SPOT_TEST_JOB") == self.tag:
                    proc.kill()
            except psutil.Error:  # gone meanwhile, or a zombie
                pass
        for agent in self.agents:
            agent.wait(timeout=30)


@pytest.fixture
def job(tmp_path):
    j = _Job(str(tmp_path))
    yield j
    j.stop()


def _gone(proc):
    """Exited (a zombie its agent has not reaped yet counts): psutil raises if it goes meanwhile."""
    try:
        return not proc.is_running() or proc.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def _losses(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return {r["step"]: r["loss"] for r in map(json.loads, f)}


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    from tests.tiny import build_train_workspace, write_reference_sidecar

    ws = build_train_workspace(str(tmp_path_factory.mktemp("cluster")))
    write_reference_sidecar(ws)
    return ws


@pytest.fixture(scope="module")
def uninterrupted(ws, tmp_path_factory):
    """Per-step losses of one 4-rank agent that nothing interrupts."""
    j = _Job(str(tmp_path_factory.mktemp("uninterrupted_logs")))
    out = str(tmp_path_factory.mktemp("uninterrupted") / "run")
    try:
        j.start(ws, out, 4, ["--standalone"])
        assert j.wait(300) == [0], j.output()
    finally:
        j.stop()
    losses = _losses(out)
    assert sorted(losses) == list(range(1, STEPS + 1))
    assert len(set(losses.values())) == STEPS  # the policy moves: equal losses below mean something
    return losses


def test_a_killed_rank_is_restarted_by_torchrun_and_resumes_exactly(ws, uninterrupted, job, tmp_path):
    out = str(tmp_path / "run")
    job.start(ws, out, 4, ["--standalone", "--max-restarts", "1"], ["run.save_interval=1", "run.load=auto"],
              fault="SIGKILL:rank=1:step=3", fresh_store_per_attempt=True)
    assert job.wait(400) == [0], job.output()
    log = job.output(tail=None)
    assert "run.load=auto: no checkpoint" in log and f"resuming from {out}/checkpoints/step_0000002" in log, log
    assert re.search(r"exitcode\s*:\s*-9", log), log  # the kill happened (torchrun's failure report)
    assert _losses(out) == uninterrupted  # bit for bit, steps 1-3


def _node_args(port, node_rank):
    # the first agent hosts the c10d store, the second joins it (both are on 127.0.0.1 here)
    return ["--nnodes", "2", "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "twonodes",
            "--rdzv-conf", f"is_host={int(node_rank == 0)}"]


def test_two_nodes_train_like_one_and_a_killed_rank_ends_every_process_on_both(ws, uninterrupted, job, tmp_path):
    out = str(tmp_path / "run")
    port = _free_port()
    for node in (0, 1):  # the kill below lands in step 3: steps 1 and 2 are compared
        job.start(ws, out, 2, _node_args(port, node), fault="SIGKILL:rank=2:step=3")
    workers = job.workers(4)
    nodes = {r: next(i for i, a in enumerate(job.agents) if p.ppid() == a.pid) for r, p in workers.items()}
    assert nodes[0] == nodes[1] and nodes[2] == nodes[3] and nodes[0] != nodes[2], nodes  # TP pairs share a node
    gone = {}
    deadline = time.time() + 300
    while len(gone) < 4 and time.time() < deadline:
        for rank, proc in workers.items():
            if rank not in gone and _gone(proc):
                gone[rank] = time.time()
        time.sleep(0.1)
    assert len(gone) == 4, job.output()
    codes = job.wait(60)
    log = job.output(tail=None)
    assert all(c != 0 for c in codes), (codes, log)
    killed_at = gone[2]
    assert min(gone.values()) == killed_at, (gone, log)  # rank 2 went first: the kill, not something else
    spread = max(gone.values()) - killed_at
    print(f"every rank gone {spread:.1f} s after the SIGKILL of rank 2; agents exited {codes}")
    assert spread <= COLLECTIVE_TIMEOUT_S + 30, (gone, log)
    # each worker's exit status, from its agent's failure report: all non-zero (-9: the killed one)
    reported = {int(pid): int(code) for code, pid in re.findall(r"exitcode\s*:\s*(-?\d+) \(pid: (\d+)\)", log)}
    assert {workers[r].pid for r in workers} <= set(reported), (reported, log)
    assert all(reported[workers[r].pid] != 0 for r in workers) and reported[workers[2].pid] == -9, reported
    losses = _losses(out)
    assert [losses[1], losses[2]] == [uninterrupted[1], uninterrupted[2]], (losses, uninterrupted)


def test_a_stopped_rank_ends_the_job_within_the_watchdog_bound_naming_it(ws, job, tmp_path):
    step_timeout = 8
    out = str(tmp_path / "run")
    # the collective timeout is longer than the watchdog bound: the watchdog, not gloo, ends this job
    job.start(ws, out, 4, ["--standalone"], ["run.step_timeout_s=%d" % step_timeout, "run.startup_timeout_s=240",
                                             "run.collective_timeout_s=120"], fault="SIGSTOP:rank=2:step=2")
    workers = job.workers(4)
    stopped = workers[2]
    deadline = time.time() + 300
    while time.time() < deadline and stopped.status() != psutil.STATUS_STOPPED:
        assert job.agents[0].poll() is None, job.output()
        time.sleep(0.1)
    stopped_at = time.time()
    healthy_gone = {}
    while len(healthy_gone) < 3 and time.time() < stopped_at + 120:
        for rank in (0, 1, 3):
            if rank not in healthy_gone and _gone(workers[rank]):
                healthy_gone[rank] = time.time() - stopped_at
        time.sleep(0.1)
    codes = job.wait(120)
    ended = time.time() - stopped_at
    log = job.output(tail=None)
    print(f"healthy ranks gone {healthy_gone} s, job ended {ended:.1f} s after SIGSTOP; exit {codes}")
    assert codes != [0]
    # the watchdog bound, its heartbeat check of the peers (3 beats) and some scheduling slack on 2 cores
    assert len(healthy_gone) == 3 and max(healthy_gone.values()) <= step_timeout + 15, (healthy_gone, log)
    # then torchrun ends the stopped rank (SIGTERM, SIGKILL 30 s later) and itself: measured 48 s on a quiet
    # box, 72 s at load average ~100 (its own shutdown took ~25 s there)
    assert ended <= step_timeout + 15 + 30 + 45, log
    lines = [ln for ln in log.splitlines() if ln.startswith("watchdog: rank ") and "made no progress" in ln]
    assert lines, log
    line = lines[0]
    me = int(line.split()[2])
    assert me in (0, 1, 3) and f"pid {workers[me].pid}, last completed step 1)" in line, line
    assert f"in training step 2 for {step_timeout} s" in line, line
    assert f"not answering: rank 2 (host {socket.gethostname()}, pid {stopped.pid}," in line, line
    dump = open(os.path.join(out, "watchdog", f"rank_{me:05d}.txt")).read()
    assert "Thread" in dump and "train.py" in dump and "train_step" in dump, dump  # the blocked main thread
