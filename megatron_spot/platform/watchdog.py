"""Step watchdog: a rank that stops making progress ends itself, with its stacks, so the launcher acts.

A hung rank (stopped, deadlocked, stuck in a collective whose peer hangs) keeps every other rank of
the job waiting. The training loop calls `progress(step)` after every completed step and
`phase(name, bound_s)` around long collective-free work (a checkpoint save, the final export); a
daemon thread checks the deadline. When it passes, the rank

- writes every thread's Python stack (faulthandler) to stderr and to `<run>/watchdog/rank_<R>.txt`,
- prints one line naming itself (global rank, host, pid, last completed step, what it was doing) and
  the ranks that stopped answering (see below),
- and exits with status 1 (os._exit: no cleanup that could block on the hung collective).

The thread needs the GIL, which torch releases while the main thread waits in a gloo or NCCL
collective. As a backstop for code that holds the GIL forever, faulthandler's own C watchdog thread
(no GIL needed) dumps the stacks and exits 60 s after the deadline.

Naming the hung peer: a SIGSTOPped or wedged rank cannot report anything itself. Every rank's thread
bumps a heartbeat counter in the launcher's key-value store (MASTER_ADDR:MASTER_PORT, torchrun's or
rank 0's TCPStore) every few seconds; the rank whose deadline passes reads the counters twice and names
the ranks whose counter did not move. Store errors are never fatal: the report then says so.
"""
from __future__ import annotations

import datetime
import faulthandler
import logging
import os
import socket
import sys
import threading
import time
from typing import Optional

log = logging.getLogger(__name__)

_BACKSTOP_S = 60.0  # faulthandler's C thread fires this long after a deadline the Python thread missed


class StepWatchdog:
    def __init__(self, rank: int, world_size: int, run_dir: str, step_timeout_s: float, startup_timeout_s: float,
                 heartbeat_s: Optional[float] = None, use_store: bool = True):
        self.rank, self.world_size, self.run_dir = rank, world_size, run_dir
        self.step_timeout_s, self.startup_timeout_s = float(step_timeout_s), float(startup_timeout_s)
        self.host, self.pid = socket.gethostname(), os.getpid()
        self.last_step: Optional[int] = None
        bounds = [b for b in (self.step_timeout_s, self.startup_timeout_s) if b > 0]
        # a few beats inside the shortest bound, never a busy store
        self.heartbeat_s = heartbeat_s or (min(5.0, max(0.5, min(bounds) / 6)) if bounds else 5.0)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._store = None
        self._use_store = use_store and world_size > 1
        # no attempt number in the keys: torchrun's restart counts can differ between nodes, and with
        # TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 (see platform/distributed.py) every attempt has a fresh store
        self._prefix = "megatron_spot/watchdog/"
        self._beats = 0
        self._set_deadline("start-up (building the model, loading checkpoints, the first step)", self.startup_timeout_s)

    # -- what the training loop calls ------------------------------------------------------------
    def start(self) -> "StepWatchdog":
        if self.enabled:
            self._thread = threading.Thread(target=self._run, name="megatron_spot-step-watchdog", daemon=True)
            self._thread.start()
        return self

    @property
    def enabled(self) -> bool:
        return self.step_timeout_s > 0 or self.startup_timeout_s > 0

    def progress(self, step: int) -> None:
        """A training step completed: the next must complete within step_timeout_s."""
        with self._lock:
            self.last_step = step
        self._set_deadline(f"training step {step + 1}", self.step_timeout_s)

    def phase(self, what: str, bound_s: Optional[float] = None) -> None:
        """Long work without steps (a checkpoint save, the export) begins: bound it by bound_s
        (default: startup_timeout_s). The next progress() returns to the step bound."""
        self._set_deadline(what, self.startup_timeout_s if bound_s is None else bound_s)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            faulthandler.cancel_dump_traceback_later()
            self._thread.join(timeout=2 * self.heartbeat_s + 5)
            self._thread = None

    # -- the thread ------------------------------------------------------------------------------
    def _set_deadline(self, what: str, bound_s: float) -> None:
        with self._lock:
            self._what, self._bound = what, bound_s
            self._deadline = time.monotonic() + bound_s if bound_s > 0 else None
        if self._thread is not None:
            if bound_s > 0:  # the GIL-free backstop, re-armed with every deadline
                faulthandler.dump_traceback_later(bound_s + _BACKSTOP_S, exit=True)
            else:
                faulthandler.cancel_dump_traceback_later()

    def _run(self) -> None:
        self._connect_store()
        if self._deadline is not None:
            faulthandler.dump_traceback_later(self._bound + _BACKSTOP_S, exit=True)
        while not self._stop.wait(self.heartbeat_s):
            self._beat()
            with self._lock:
                deadline, what, bound = self._deadline, self._what, self._bound
            if deadline is not None and time.monotonic() > deadline:
                self._fire(what, bound)

    def _connect_store(self) -> None:
        if not self._use_store or "MASTER_ADDR" not in os.environ or "MASTER_PORT" not in os.environ:
            return
        try:
            import torch.distributed as dist

            self._store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                                        timeout=datetime.timedelta(seconds=max(1.0, self.heartbeat_s)),
                                        wait_for_workers=False)
            self._store.set(f"{self._prefix}who/{self.rank}", f"host {self.host}, pid {self.pid}")
        except Exception as exc:  # diagnostics only: the watchdog works without it
            log.debug("watchdog: no key-value store (%s)", exc)
            self._store = None

    def _beat(self) -> None:
        if self._store is None:
            return
        self._beats += 1
        try:
            self._store.set(f"{self._prefix}beat/{self.rank}", f"{self._beats} {self.last_step}")
        except Exception:
            pass

    def _read_beats(self) -> dict[int, Optional[str]]:
        out = {}
        for r in range(self.world_size):
            try:
                out[r] = self._store.get(f"{self._prefix}beat/{r}").decode()
            except Exception:
                out[r] = None
        return out

    def _silent_peers(self) -> str:
        """', '.join of the ranks whose heartbeat did not move over two beats, with host/pid/last step."""
        if self._store is None:
            return "unknown (no key-value store)"
        before = self._read_beats()
        for _ in range(3):  # keep beating meanwhile: peers whose deadline passed too are asking the same
            time.sleep(self.heartbeat_s)
            self._beat()
        after = self._read_beats()
        silent = [r for r in range(self.world_size) if r != self.rank and (after[r] is None or after[r] == before[r])]
        if not silent:
            return "none (every rank's watchdog still answers: a collective is waiting on a live rank)"
        parts = []
        for r in silent:
            try:
                who = self._store.get(f"{self._prefix}who/{r}").decode()
            except Exception:
                who = "host ?, pid ?"
            last = after[r].split()[1] if after[r] else "?"  # as of its last heartbeat: it may be one behind
            parts.append(f"rank {r} ({who}, last step it reported: {'none' if last == 'None' else last})")
        return "; ".join(parts)

    def _fire(self, what: str, bound: float) -> None:
        faulthandler.cancel_dump_traceback_later()
        me = f"rank {self.rank} ({'host ' + self.host}, pid {self.pid}, last completed step {self.last_step})"
        path = os.path.join(self.run_dir, "watchdog", f"rank_{self.rank:05d}.txt")
        try:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "w") as f:
                f.write(f"watchdog: {me}: no progress in {what} for {bound:g} s; stacks of every thread:\n")
                faulthandler.dump_traceback(file=f, all_threads=True)
        except OSError as exc:
            path = f"(not written: {exc})"
        try:
            sys.stderr.write(f"watchdog: stacks of {me}:\n")
            sys.stderr.flush()
            faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
        except Exception:
            pass
        silent = self._silent_peers()
        sys.stderr.write(f"watchdog: {me} made no progress in {what} for {bound:g} s (run.step_timeout_s / "
                         f"run.startup_timeout_s); not answering: {silent}; stacks in {path}; exiting with status 1\n")
        sys.stderr.flush()
        os._exit(1)
