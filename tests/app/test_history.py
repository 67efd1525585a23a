"""The History index (app/web/history.py): a row that cannot be written is skipped and told, never
an error for the request whose images are saved; the next row is written. A real lock held by
another writer (a replica sharing the file, a backup); the whole route: tests/integration/test_api.py."""

import sqlite3

from app.web.history import History


def test_a_row_locked_out_is_skipped_and_told_and_the_next_is_written(tmp_path, caplog):
    path = tmp_path / "history.sqlite"
    history = History(path, busy_timeout_s=0.2)
    other = sqlite3.connect(str(path), isolation_level=None)
    other.execute("BEGIN EXCLUSIVE")
    with caplog.at_level("WARNING", logger="app.web.history"):
        assert history.add("r1", 1.0, {"prompt": "a"}, 1, {}, ["a.png"]) is False
    told = [r for r in caplog.records if getattr(r, "event", None) == "history_write_failed"]
    assert told and told[0].request_id == "r1" and "locked" in told[0].error
    other.execute("COMMIT")
    other.close()
    assert history.add("r2", 2.0, {"prompt": "b"}, 2, {}, ["b.png"]) is True
    assert [entry["request_id"] for entry in history.page()] == ["r2"]
