"""The engine's heartbeat writer: which stage of which generation runs, since when, and how long
that stage has taken before for this shape. Written by the engine thread, read by /healthz as a
common.heartbeat.Heartbeat; plain attribute writes are atomic in CPython.

Why per stage and shape: one stall bound for everything has to cover the slowest thing the service
does (a 2048², 4-image decode, a first compile), so a stuck 0.1 s step went unnoticed for a minute.
With the slowest time of *this* stage at *this* shape, the monitor's bound is k × that, seconds."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from app.runtime.compilewatch import CompileWatch
from common.heartbeat import Heartbeat as HeartbeatModel

Shape = tuple[int, int, int]  # width, height, images in the batch
MAX_SHAPES = 64  # distinct shapes remembered per stage (request shapes are few; this bounds memory)


def estimate_slowest(table: dict[tuple[str, Shape], float], stage: str, shape: Shape) -> Optional[float]:
    """The slowest seen time of `stage` at `shape`; for a shape not seen yet, the seen ones scaled by
    the work ratio to the power 1.5 (attention grows faster than the pixel count), never below 1×.
    None when the stage was never timed."""
    if (stage, shape) in table:
        return table[(stage, shape)]
    work = shape[0] * shape[1] * shape[2]
    scaled = [
        seconds * max(1.0, work / (s[0] * s[1] * s[2])) ** 1.5
        for (name, s), seconds in table.items()
        if name == stage
    ]
    return max(scaled) if scaled else None


@dataclass
class Heartbeat:
    busy_since: Optional[float] = None  # wall-clock time (epoch seconds) the running batch started
    last_step_at: Optional[float] = None  # wall-clock time of the last finished denoising step
    steps_done: int = 0
    steps_total: int = 0
    request_ids: tuple = ()
    step_seconds_ewma: Optional[float] = None  # typical step duration
    step_seconds_max: float = 0.0
    generations: int = 0
    compile_watch: Optional[CompileWatch] = None  # says when torch.compile is working (no steps then)
    warm: bool = False
    stage: Optional[str] = None
    stage_started_at: Optional[float] = None
    shape: Optional[Shape] = None
    slowest: dict = field(default_factory=dict)  # (stage, shape) → slowest seconds seen, compiles excluded

    def begin(self, shape: Shape, request_ids: tuple, steps_total: int, now: float) -> None:
        self.shape, self.request_ids, self.steps_total, self.steps_done = shape, request_ids, steps_total, 0
        self.busy_since = self.last_step_at = now
        self.stage, self.stage_started_at = None, now

    def enter_stage(
        self, stage: Optional[str], now: float, previous_s: Optional[float], compiled: bool
    ) -> None:
        """The previous stage ended after previous_s seconds (recorded unless it compiled); `stage`
        begins (None: the generation's last stage ended)."""
        if self.stage is not None and previous_s is not None and not compiled:
            self._record(self.stage, previous_s)
        self.stage, self.stage_started_at = stage, now

    def record_step(self, step: int, step_s: float, now: float, compiled: bool) -> None:
        """A finished denoising step. A step that contained a compile is progress but not a step
        time: counted in, it would stretch the monitor's stall bound for the life of the process."""
        self.steps_done = step + 1
        self.last_step_at = now
        if compiled:
            return
        self._record("denoise", step_s)
        self.step_seconds_max = max(self.step_seconds_max, step_s)
        self.step_seconds_ewma = (
            step_s if self.step_seconds_ewma is None else 0.8 * self.step_seconds_ewma + 0.2 * step_s
        )

    def end(self) -> None:
        self.busy_since, self.request_ids, self.stage, self.stage_started_at = None, (), None, None

    def _record(self, stage: str, seconds: float) -> None:
        if self.shape is None:
            return
        key = (stage, self.shape)
        if key not in self.slowest and sum(1 for k in self.slowest if k[0] == stage) >= MAX_SHAPES:
            return
        self.slowest[key] = max(self.slowest.get(key, 0.0), seconds)

    def snapshot(self) -> dict:
        watch = self.compile_watch
        slowest = (
            estimate_slowest(self.slowest, self.stage, self.shape) if self.stage and self.shape else None
        )
        return HeartbeatModel(
            busy=self.busy_since is not None,
            busy_since=self.busy_since,
            last_step_at=self.last_step_at,
            steps_done=self.steps_done,
            steps_total=self.steps_total,
            request_ids=list(self.request_ids),
            step_seconds_ewma=self.step_seconds_ewma,
            step_seconds_max=self.step_seconds_max,
            generations=self.generations,
            compiling_since=watch.active_since if watch else None,
            stage=self.stage,
            stage_started_at=self.stage_started_at,
            stage_slowest_s=slowest,
            warm=self.warm,
        ).model_dump()
