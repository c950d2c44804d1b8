"""The step watchdog on its own (the 4-rank SIGSTOP case is in tests/training/test_cluster_faults.py): a
process whose main thread stops making progress is ended by the watchdog thread with exit status 1, one
line naming the rank, its pid, its last completed step and what it was doing, and every thread's stack
in <run>/watchdog/rank_<R>.txt; progress keeps it alive; a stopped watchdog never fires."""
import os
import subprocess
import sys
import textwrap

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

_CHILD = textwrap.dedent("""
    import os, sys, threading, time
    from megatron_spot.platform.watchdog import StepWatchdog

    run_dir, mode = sys.argv[1], sys.argv[2]
    wd = StepWatchdog(rank=3, world_size=1, run_dir=run_dir, step_timeout_s=1.0, startup_timeout_s=30.0).start()
    for step in (1, 2, 3):  # steps well inside the bound
        time.sleep(0.3)
        wd.progress(step)
    if mode == "stop":
        wd.stop()
        time.sleep(2.5)
        print("finished")
        sys.exit(0)
    def blocked_in_collective():  # the main thread waits forever, the GIL released, as in a collective
        threading.Event().wait()
    blocked_in_collective()
""")


def _run(tmp_path, mode):
    return subprocess.run([sys.executable, "-c", _CHILD, str(tmp_path), mode], capture_output=True, text=True,
                          cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT), timeout=120)


def test_a_rank_without_progress_dumps_its_stacks_names_itself_and_exits_1(tmp_path):
    proc = _run(tmp_path, "hang")
    assert proc.returncode == 1, proc.stderr
    line = proc.stderr.strip().splitlines()[-1]
    assert line.startswith("watchdog: rank 3 (host ") and ", last completed step 3) made no progress in " \
        "training step 4 for 1 s" in line and "exiting with status 1" in line, line
    stacks = open(os.path.join(tmp_path, "watchdog", "rank_00003.txt")).read()
    assert "blocked_in_collective" in stacks and "_fire" in stacks, stacks  # the main thread and the watchdog's
    assert "blocked_in_collective" in proc.stderr  # and on stderr


def test_a_stopped_watchdog_never_fires(tmp_path):
    proc = _run(tmp_path, "stop")
    assert proc.returncode == 0 and proc.stdout.strip() == "finished", proc.stderr
    assert not os.path.exists(os.path.join(tmp_path, "watchdog"))
