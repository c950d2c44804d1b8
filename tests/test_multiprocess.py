"""tests/multiprocess.py itself: a hung rank fails the test within its timeout and is killed, and the
failure shows what the ranks printed."""
import time

import pytest

from tests.multiprocess import run_on_ranks


def _hang(rank, world_size, pid_dir):
    import os

    import torch.distributed as dist

    dist.barrier()  # both ranks are past gloo's start-up before rank 0 returns and takes its group down

    with open(os.path.join(pid_dir, f"{rank}.pid"), "w") as f:
        f.write(str(os.getpid()))
    print(f"rank {rank} is about to hang", flush=True)
    if rank == 1:
        time.sleep(3600)
    return rank


def test_hung_rank_is_killed_and_reported(tmp_path):
    import os

    start = time.monotonic()
    with pytest.raises(AssertionError) as err:
        run_on_ranks(_hang, world_size=2, args=(str(tmp_path),), timeout_s=20)
    assert time.monotonic() - start < 60
    text = str(err.value)
    assert "still running after 20 s" in text and "rank 1 is about to hang" in text
    pid = int((tmp_path / "1.pid").read_text())
    with pytest.raises(ProcessLookupError):  # the hung rank is gone (killed and reaped)
        os.kill(pid, 0)
