"""A rank other than 0 of a context-parallel app: the same pipeline, running what rank 0 shares
(app/runtime/parallel.py has the why)."""

from __future__ import annotations

import logging
import time

import torch

from app.runtime.loader import load_pipeline
from app.runtime.lora_merge import lora_set_for
from app.runtime.parallel import RankEnv, RankLink
from app.runtime.stages import PromptEmbeddingCache, run_batch

log = logging.getLogger(__name__)


class _Stop(Exception):
    """Rank 0 cancelled the running batch: every rank leaves it at the same step."""


def serve_follower(settings) -> int:
    """A rank other than 0: load the same pipeline, then run whatever rank 0 shares, until told to
    stop (returns 0). Any failure propagates: the process exits non-zero and rank 0 follows
    (app/ranks.py), because a rank that dropped out of a generation can never catch up."""
    loaded = load_pipeline(settings)
    env = RankEnv.from_env()
    link = RankLink(env.rank)
    cache = PromptEmbeddingCache(settings.prompt_cache_size)
    loras = lora_set_for(loaded.pipe, settings)
    log.info("rank ready", extra={"event": "rank_ready", "rank": env.rank, "notes": loaded.notes})
    stance_set = False
    step_delay = [0.0]  # this rank's drill delay for the running batch (RankWork.step_delays)

    def on_step_end(_pipe, _step, _timestep, callback_kwargs):
        if step_delay[0]:
            time.sleep(step_delay[0])
        if link.agree_to_stop(False):
            raise _Stop()
        return callback_kwargs

    while (work := link.share(None)) is not None:
        step_delay[0] = dict(work.step_delays).get(env.rank, 0.0)
        if (
            work.eager_on_recompile
            and loaded.compiled
            and not settings.compile_in_requests
            and not stance_set
        ):
            torch.compiler.set_stance("eager_on_recompile")  # what rank 0 did after its warm-up
            stance_set = True
        try:
            if loras is not None:  # the same files as rank 0 merged a moment ago
                loras.apply(work.loras)
            with torch.inference_mode():
                run_batch(loaded.pipe, work.request(), loaded.exec_device, cache, on_step_end)
        except _Stop:
            continue
    log.info("rank stopped", extra={"event": "rank_stopped", "rank": env.rank})
    return 0
