"""The app's heartbeat: what /healthz reports about the running generation, and what the monitor
reads to tell a long generation from a stalled one. One typed model, written by the app and parsed
by the monitor, so the two cannot drift apart on a field name."""

from __future__ import annotations

from typing import Literal, Optional

from pydantic import BaseModel, ConfigDict

# The parts of one generation, in order; a denoising step is its own stage ("denoise").
Stage = Literal["encode", "denoise", "decode", "save"]


class Heartbeat(BaseModel):
    model_config = ConfigDict(extra="ignore")  # an older or newer app: unknown fields are not an error

    busy: bool = False
    busy_since: Optional[float] = None  # epoch seconds the running batch started
    last_step_at: Optional[float] = None  # epoch seconds of the last finished denoising step
    steps_done: int = 0
    steps_total: int = 0
    request_ids: list[str] = []
    step_seconds_ewma: Optional[float] = None
    step_seconds_max: float = 0.0
    generations: int = 0
    compiling_since: Optional[float] = None  # torch.compile at work: no step can end meanwhile
    # Stage-aware progress: the stage running now, since when (a denoising step: since the last
    # step ended), and the slowest this stage has taken for this batch's shape (an estimate
    # scaled from other shapes when this one is new; None when nothing is known yet).
    stage: Optional[Stage] = None
    stage_started_at: Optional[float] = None
    stage_slowest_s: Optional[float] = None
    warm: bool = False  # the warm-up generation has finished: stage times are known

    def silent_for(self, now: float) -> Optional[float]:
        """Seconds since the last sign of progress of the running stage (None when idle)."""
        if not self.busy:
            return None
        marks = [
            t
            for t in (
                self.stage_started_at,
                self.last_step_at if self.stage == "denoise" else None,
                self.busy_since if self.stage is None else None,
            )
            if t is not None
        ]
        return now - max(marks) if marks else None
