"""Age-based pruning of Gradio's copies, with an injected `now` instead of sleeping."""

import os

from app.web.retention import prune_older_than, reset_dir, stage


def make(path, age_s, now, size=10):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x" * size)
    os.utime(path, (now - age_s, now - age_s))


def test_prunes_only_files_older_than_the_age_and_their_empty_dirs(tmp_path):
    now = 1_000_000.0
    make(tmp_path / "h1" / "old.png", 7200, now, 100)
    make(tmp_path / "h2" / "new.png", 60, now, 50)
    make(tmp_path / "staged" / "old2.png", 3601, now, 7)
    assert prune_older_than(tmp_path, 3600, now) == (2, 107)
    assert sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*")) == ["h2", "h2/new.png"]
    assert prune_older_than(tmp_path, 3600, now + 3600) == (1, 50)
    assert tmp_path.is_dir()  # the root itself stays
    assert prune_older_than(tmp_path / "missing", 1, now) == (0, 0)


def test_reset_empties_and_closes_the_dir_and_stage_links_without_copying(tmp_path):
    root = tmp_path / "gradio"
    make(root / "stale" / "a.png", 0, 0)
    reset_dir(root)
    assert list(root.iterdir()) == [] and (root.stat().st_mode & 0o777) == 0o700
    source = tmp_path / "outputs" / "img.png"
    make(source, 0, 0)
    staged = stage(source, root / "staged")
    assert staged.read_bytes() == source.read_bytes() and os.path.samefile(staged, source)
    assert stage(source, root / "staged") == staged  # again: no error, same file


def test_outputs_retention_deletes_the_oldest_first_and_never_a_protected_file(tmp_path):
    from app.web.retention import enforce_outputs

    now = 1_000_000.0
    for i, name in enumerate(["a.png", "b.png", "c.png", "d.png"]):
        path = tmp_path / name
        path.write_bytes(b"x" * 100)
        os.utime(path, (now - 1000 + i * 100, now - 1000 + i * 100))  # a oldest … d newest
    # over the size: oldest go first, until 200 bytes are left; b is in a live job's answer
    deleted = enforce_outputs(tmp_path, 200, None, {"b.png"}, now)
    assert [n for n, _ in deleted] == ["a.png", "c.png"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b.png", "d.png"]
    # by age: older than 800 s goes (b, protected, stays)
    assert enforce_outputs(tmp_path, None, 800, {"b.png"}, now) == []
    assert [n for n, _ in enforce_outputs(tmp_path, None, 750, set(), now)] == ["b.png"]
    assert enforce_outputs(tmp_path, None, None, set(), now) == []  # no limit configured: nothing
    # a file younger than min_age_s may be in an answer on its way (any replica's): kept
    assert enforce_outputs(tmp_path, 1, None, set(), now, min_age_s=800) == []
