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


def test_a_kept_position_resumes_without_repeating(tmp_path):
    log = tmp_path / "app.log"
    log.write_bytes(OOM)
    f = follower(log)
    with open(log, "ab") as fh:
        fh.write(OOM)
    assert len(f.poll()) == 1
    position = f.position  # what the journal keeps
    with open(log, "ab") as fh:
        fh.write(OOM)  # written while the monitor was away
    again = follower(log, resume=position)
    assert len(again.poll()) == 1  # the new line once, the two old ones never
    assert again.poll() == []


def json_line(pid: int, msg: str = "request") -> bytes:
    return (
        '{"ts": "2026-11-30T12:00:00.000Z", "level": "info", "service": "app", "pid": %d, "msg": "%s"}\n'
        % (pid, msg)
    ).encode()


def test_every_line_is_attributed_to_the_process_that_wrote_it(tmp_path):
    log = tmp_path / "app.log"
    log.write_bytes(json_line(41) + OOM)  # history: the follower starts at the end, but knows whose it was
    f = follower(log)
    assert f.position["last_pid"] == 41
    with open(log, "ab") as fh:
        fh.write(OOM)  # a raw line after pid 41's JSON line: pid 41's
        fh.write(json_line(42, "starting") + OOM)  # a new process, then a raw line: pid 42's
        fh.write(b'{"level": "error", "pid": 42, "msg": "torch.OutOfMemoryError: CUDA out of memory"}\n')
    assert [e.pid for e in f.poll()] == [41, 42, 42]


def test_a_line_appended_while_the_app_was_down_belongs_to_the_process_before(tmp_path):
    """`zimagectl down`, an OOM line appended by hand, `zimagectl up`: the resumed follower gives it
    the last process's pid, so the core treats it as history."""
    log = tmp_path / "app.log"
    log.write_bytes(json_line(7, "stopped"))
    position = follower(log).position
    with open(log, "ab") as fh:
        fh.write(OOM)
    events = follower(log, resume=position).poll()
    assert len(events) == 1 and events[0].pid == 7


def test_non_matching_and_binary_lines_are_ignored(tmp_path):
    log = tmp_path / "app.log"
    log.write_bytes(b"")
    f = follower(log)
    with open(log, "ab") as fh:
        fh.write(b'{"msg": "generated"}\n\xff\xfe\x00binary\n')
    assert f.poll() == []


def test_the_shared_cuda_markers_are_plain_text_patterns():
    from common.cuda_markers import FATAL_CUDA_MARKERS, OOM_MARKERS

    for marker in FATAL_CUDA_MARKERS + OOM_MARKERS:
        assert not set(marker) & set(".^$*+?{}[]\\|()"), marker  # no metacharacter to misread
    assert {p.pattern for p in DEFAULT_PATTERNS} == set(FATAL_CUDA_MARKERS + OOM_MARKERS)
