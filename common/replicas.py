"""One app per GPU: which replicas a stack runs, and where each one listens, logs and keeps state.

With `app.replicas = 1` (the default) there is one app, supervisord program `app`, on `app.port`,
logging to logs/app.log: exactly the single-GPU layout. With N > 1 supervisord runs the program
group `app` with processes app-0 … app-(N-1) (numprocs, `CUDA_VISIBLE_DEVICES` = the replica's
index), each on `replica_base_port + i`, with its own log and its monitor's own files under
run/replica-<i>/; HAProxy takes `app.port`. A process learns its index from ZIMAGE_REPLICA, which
supervisord sets from %(process_num)d."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Optional, Union

REPLICA_ENV = "ZIMAGE_REPLICA"
REPLICAS_ENV = "ZIMAGE_REPLICAS"  # the count, for supervisord's numprocs=%(ENV_ZIMAGE_REPLICAS)s
# HAProxy answers this itself on the public port (monitor-uri): the balancer alive, no replica asked
# and no balancing decision made (replica 0's monitor probes it every tick).
BALANCER_ALIVE_PATH = "/balancer/alive"
# HAProxy's health checks of each replica (`inter`, `fall`; ops/balancer.py writes them): a replica
# whose /readyz fails leaves the pool within CHECK_INTERVAL_S * CHECK_FALL.
CHECK_INTERVAL_S = 0.5
CHECK_FALL = 2
# How long a draining replica stays reachable (answering 503) before it may exit: until HAProxy has
# taken it out of the pool, plus one check. An idle replica that exited at once was still in the pool
# for up to a second: the retries HAProxy sent it met a refused connection, and a client whose
# request ended that way on a kept-alive connection was closed on without an answer (HAProxy's way
# to say "retry", which no HTTP client does for a POST). Found by `zimagectl drill --replicas 2`.
POOL_LEAVE_S = CHECK_INTERVAL_S * (CHECK_FALL + 1)


@dataclass(frozen=True)
class Replica:
    index: Optional[int]  # None: the one app of a single-replica stack
    program: str  # supervisord's name for XML-RPC: "app", or "app:app-<i>" in the group
    port: int
    log: Path  # relative to the home
    run_dir: Path  # the monitor's journal, state and maintenance mark (relative to the home)

    @property
    def label(self) -> str:
        return "app" if self.index is None else f"app-{self.index}"


def replica_index(env: Mapping[str, str]) -> Optional[int]:
    value = env.get(REPLICA_ENV, "").strip()
    return int(value) if value.isdigit() else None


def visible_gpu_count() -> int:
    """GPUs NVML sees (0 without NVML or a GPU)."""
    try:
        import pynvml

        pynvml.nvmlInit()
        try:
            return int(pynvml.nvmlDeviceGetCount())
        finally:
            pynvml.nvmlShutdown()
    except Exception:
        return 0


def replica_count(value: Union[int, str]) -> int:
    """`replicas` as configured: a number, or "auto" for one per visible GPU (at least one)."""
    if value == "auto":
        return max(1, visible_gpu_count())
    return int(value)


def layout(count: int, public_port: int, base_port: int) -> list[Replica]:
    if count <= 1:
        return [Replica(None, "app", public_port, Path("logs/app.log"), Path("run"))]
    return [
        Replica(i, f"app:app-{i}", base_port + i, Path(f"logs/app-{i}.log"), Path(f"run/replica-{i}"))
        for i in range(count)
    ]
