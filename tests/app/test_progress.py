"""The heartbeat writer: stage times per shape, the estimate for a new shape, and what /healthz says."""

from app.runtime.progress import Heartbeat, estimate_slowest
from common.heartbeat import Heartbeat as Model


def test_stage_times_are_kept_per_shape_without_compiles():
    hb = Heartbeat()
    hb.begin((1024, 1024, 1), ("r1",), 8, now=100.0)
    hb.enter_stage("encode", 100.0, None, compiled=False)
    hb.enter_stage("denoise", 100.02, 0.02, compiled=False)
    hb.record_step(0, 0.5, 100.5, compiled=True)  # a compile inside: progress, not a step time
    hb.record_step(1, 0.1, 100.6, compiled=False)
    hb.enter_stage("decode", 100.6, 0.58, compiled=True)  # the denoise stage compiled: not recorded
    hb.enter_stage(None, 100.65, 0.05, compiled=False)
    hb.end()
    assert hb.slowest == {
        ("encode", (1024, 1024, 1)): 0.02,
        ("denoise", (1024, 1024, 1)): 0.1,
        ("decode", (1024, 1024, 1)): 0.05,
    }
    snap = Model.model_validate(hb.snapshot())
    assert not snap.busy and snap.stage is None and snap.silent_for(200.0) is None


def test_a_new_shape_is_estimated_from_the_seen_ones_by_work():
    table = {("denoise", (1024, 1024, 1)): 0.1, ("decode", (1024, 1024, 1)): 0.05}
    assert estimate_slowest(table, "denoise", (1024, 1024, 1)) == 0.1
    # 2048², 4 images: 16x the work → 0.1 × 16^1.5 = 6.4 s; smaller shapes never go below the seen time
    assert abs(estimate_slowest(table, "denoise", (2048, 2048, 4)) - 6.4) < 1e-9
    assert estimate_slowest(table, "denoise", (512, 512, 1)) == 0.1
    assert estimate_slowest(table, "encode", (1024, 1024, 1)) is None


def test_the_snapshot_reports_the_running_stage_and_its_bound_input():
    hb = Heartbeat(warm=True)
    hb.slowest[("denoise", (512, 512, 1))] = 0.2
    hb.begin((512, 512, 1), ("r9",), 8, now=50.0)
    hb.enter_stage("denoise", 50.1, 0.1, compiled=False)
    hb.record_step(0, 0.2, 50.3, compiled=False)
    snap = Model.model_validate(hb.snapshot())
    assert snap.busy and snap.warm and snap.stage == "denoise" and snap.stage_slowest_s == 0.2
    assert snap.request_ids == ["r9"] and abs(snap.silent_for(51.3) - 1.0) < 1e-9  # since the last step
