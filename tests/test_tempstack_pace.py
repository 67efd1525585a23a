"""StackHome.pace: the factor by which the integration tests stretch their bounds on a restart."""

import json

from ops.tempstack import REFERENCE_LOAD_S, StackHome


def loaded(seconds: float) -> str:
    return json.dumps({"event": "model_loaded", "msg": "model loaded", "seconds": seconds}) + "\n"


def test_pace_follows_the_latest_loads_and_never_shrinks_a_bound(tmp_path):
    stack = StackHome(tmp_path)
    assert stack.pace() == 1.0  # no load yet: the bounds as written
    log = tmp_path / "logs" / "app.log"
    log.write_text(loaded(REFERENCE_LOAD_S / 2) + '{"event": "ready"}\nnot json "model_loaded"\n')
    assert stack.pace() == 1.0 and stack.within(30) == 30  # a fast machine keeps the bound
    with open(log, "a") as fh:
        fh.write(loaded(REFERENCE_LOAD_S * 3) + loaded(REFERENCE_LOAD_S) + loaded(REFERENCE_LOAD_S))
    assert stack.pace() == 3.0 and stack.within(30) == 90
    with open(log, "a") as fh:
        fh.write(loaded(REFERENCE_LOAD_S))  # the slow load is no longer among the latest three
    assert stack.pace() == 1.0
    (tmp_path / "logs" / "app-1.log").write_text(loaded(REFERENCE_LOAD_S * 2))  # a replica's log counts
    assert stack.pace() == 2.0
