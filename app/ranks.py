"""The processes of a context-parallel app (parallel = "context"): this process is rank 0 (HTTP, the
engine); it starts ranks 1…N-1 (python -m app.follower), one GPU each, and ties their fates together.

supervisord runs one program, so the monitor, `zimagectl` and the stop signal see one service:
- a rank that exits on its own (a crash, an OOM it could not survive) takes rank 0 down with it
  (exit 70), and supervisord restarts the whole group;
- rank 0 dying takes the others down (the kernel sends them SIGKILL: PR_SET_PDEATHSIG);
- a rank that hangs stalls rank 0's generation in a collective; the monitor sees the stalled
  heartbeat and restarts the program, and killasgroup reaches every rank.
torchrun would do the launching, but its agent answers SIGTERM by stopping the workers at once, and
rank 0 must first drain (finish the running generation, with the other ranks' help)."""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from typing import Optional

from app.config import AppSettings

log = logging.getLogger(__name__)

RANK_EXITED = 70  # rank 0's exit status when another rank died: supervisord restarts the group
STOP_WAIT_S = 15.0  # after rank 0's drain, for the others to exit (they were told to): then killed

_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:  # runs in the child between fork and exec
    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


def rank_gpus(degree: int, visible: Optional[str]) -> list[Optional[str]]:
    """The GPU each rank computes on: the first `degree` of this process's visible GPUs (all of
    them when unset). None for every rank on a machine without GPUs."""
    if visible is None:
        try:
            import pynvml

            pynvml.nvmlInit()
            visible = ",".join(str(i) for i in range(pynvml.nvmlDeviceGetCount()))
        except Exception:  # no NVML: no GPUs (the CPU path: the tests, gloo)
            return [None] * degree
    gpus = [g.strip() for g in visible.split(",") if g.strip()]
    if not gpus:
        return [None] * degree
    if len(gpus) < degree:
        raise RuntimeError(
            f"parallel_degree = {degree} needs {degree} GPUs; this process sees {len(gpus)} ({visible})"
        )
    return gpus[:degree]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Ranks:
    def __init__(self, procs: list[subprocess.Popen]):
        self.procs = procs
        self.stopping = False

    def watch(self) -> None:
        for rank, proc in enumerate(self.procs, start=1):
            threading.Thread(
                target=self._wait, args=(rank, proc), name=f"rank{rank}-watch", daemon=True
            ).start()

    def _wait(self, rank: int, proc: subprocess.Popen) -> None:
        code = proc.wait()
        if code == 0 or self.stopping:  # told to stop by rank 0 (its drain is over), or stopped below
            return
        log.critical(
            "a context-parallel rank exited; restarting the group",
            extra={"event": "rank_exited", "rank": rank, "exit_code": code},
        )
        logging.shutdown()
        os._exit(RANK_EXITED)

    def stop(self, timeout_s: float = STOP_WAIT_S) -> None:
        """Once rank 0 has served its last request (the ranks were told to stop): wait for them, so
        the whole group is gone, and its GPUs free, when supervisord sees the program stopped and
        starts the next one. PDEATHSIG alone left a rank still exiting (seen in CI) or unreaped.
        A rank that does not stop in time (never told: the engine never got ready) is killed."""
        self.stopping = True
        deadline = time.monotonic() + timeout_s
        for rank, proc in enumerate(self.procs, start=1):
            try:
                proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning("a rank did not stop: killed", extra={"event": "rank_killed", "rank": rank})
                proc.kill()
                proc.wait()


def start(settings: AppSettings, env=os.environ) -> Optional[Ranks]:
    """For parallel = "context": make this process rank 0 and start the others, before this process
    touches CUDA (CUDA_VISIBLE_DEVICES is set for the group here). Nothing to do otherwise."""
    if settings.parallel != "context":
        return None
    degree = settings.parallel_degree
    gpus = rank_gpus(degree, env.get("CUDA_VISIBLE_DEVICES"))
    common = {
        "ZIMAGE_PARALLEL_WORLD": str(degree),
        "ZIMAGE_PARALLEL_ADDR": "127.0.0.1",
        "ZIMAGE_PARALLEL_PORT": str(_free_port()),
        "ZIMAGE_PARALLEL_PARENT": str(os.getpid()),
    }
    if gpus[0] is not None:
        # Every rank sees the group's GPUs and computes on the one of its rank (cuda:<rank>): NCCL
        # reaches a peer GPU over NVLink only when the process can see it.
        common["CUDA_VISIBLE_DEVICES"] = ",".join(gpus)
    os.environ.update(common, ZIMAGE_PARALLEL_RANK="0")
    procs = []
    for rank in range(1, degree):
        child_env = {**env, **common, "ZIMAGE_PARALLEL_RANK": str(rank)}
        procs.append(
            subprocess.Popen(
                [sys.executable, "-m", "app.follower"], env=child_env, preexec_fn=_die_with_parent
            )
        )
    log.info(
        "started the context-parallel ranks",
        extra={"event": "ranks_started", "world": degree, "gpus": gpus, "pids": [p.pid for p in procs]},
    )
    ranks = Ranks(procs)
    ranks.watch()
    return ranks
