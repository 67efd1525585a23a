"""The log follower on real files: offsets, rotation, truncation, saved positions."""

import os

from monitor.config import DEFAULT_PATTERNS
from monitor.logwatch import LogFollower

OOM = b"torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB\n"


def follower(path, **kw):
    return LogFollower(path, DEFAULT_PATTERNS, **kw)


def test_lines_present_at_start_are_history(tmp_path):
    log = tmp_path / "app.log"
    log.write_bytes(b"starting\n" + OOM)
    f = follower(log)
    assert f.poll() == []
    with open(log, "ab") as fh:
        fh.write(OOM)
    events = f.poll()
    assert len(events) == 1 and events[0].pattern == "CUDA out of memory"
    assert f.poll() == []  # never twice


def test_partial_lines_wait_for_their_newline(tmp_path):
    log = tmp_path / "app.log"
    log.write_bytes(b"")
    f = follower(log)
    with open(log, "ab") as fh:
        fh.write(OOM[:20])
        fh.flush()
        assert f.poll() == []
        fh.write(OOM[20:])
    assert len(f.poll()) == 1


def test_rotation_reads_the_rest_of_the_old_file_then_the_new(tmp_path):
    log = tmp_path / "app.log"
    log.write_bytes(b"old\n")
    f = follower(log)
    with open(log, "ab") as fh:
        fh.write(OOM)  # written just before rotation, not yet read
    os.rename(log, tmp_path / "app.log.1")
    log.write_bytes(b"fresh file\n" + OOM)
    assert len(f.poll()) == 2
    assert f.poll() == []


def test_truncation_restarts_from_zero(tmp_path):
    log = tmp_path / "app.log"
    log.write_bytes(b"x" * 1000 + b"\n")
    f = follower(log)
    log.write_bytes(OOM)  # truncated and rewritten, now shorter than our offset
    assert len(f.poll()) == 1


def test_missing_file_is_followed_from_byte_zero_once_it_appears(tmp_path):
    log = tmp_path / "app.log"
    f = follower(log)
    assert f.poll() == []
    log.write_bytes(OOM)
    assert len(f.poll()) == 1


def test_saved_position_resumes_without_repeating(tmp_path):
    log, pos = tmp_path / "app.log", tmp_path / "pos.json"
    log.write_bytes(OOM)
    f = follower(log, position_file=pos)
    with open(log, "ab") as fh:
        fh.write(OOM)
    assert len(f.poll()) == 1
    f.save_position()
    with open(log, "ab") as fh:
        fh.write(OOM)  # written while the monitor was away
    again = follower(log, position_file=pos)
    assert len(again.poll()) == 1  # the new line once, the two old ones never
    assert again.poll() == []


def test_non_matching_and_binary_lines_are_ignored(tmp_path):
    log = tmp_path / "app.log"
    log.write_bytes(b"")
    f = follower(log)
    with open(log, "ab") as fh:
        fh.write(b'{"msg": "generated"}\n\xff\xfe\x00binary\n')
    assert f.poll() == []
