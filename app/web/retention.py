"""Age-based retention of a directory tree of generated files (Gradio's copies of the images it
shows). `now` is passed in, so a test sets the clock instead of sleeping."""

from __future__ import annotations

import os
import shutil
from pathlib import Path


def prune_older_than(root: Path, max_age_s: float, now: float) -> tuple[int, int]:
    """Delete files under root last modified more than max_age_s before now, then the directories
    that left empty. Returns (files removed, bytes removed). A file that vanishes meanwhile is skipped."""
    removed = freed = 0
    if not root.is_dir():
        return 0, 0
    for dirpath, dirnames, filenames in os.walk(root, topdown=False):
        for name in filenames:
            path = os.path.join(dirpath, name)
            try:
                info = os.lstat(path)
                if now - info.st_mtime > max_age_s:
                    os.remove(path)
                    removed, freed = removed + 1, freed + info.st_size
            except FileNotFoundError:
                continue
        if dirpath != str(root):
            try:
                os.rmdir(dirpath)  # only succeeds when empty
            except OSError:
                pass
    return removed, freed


def reset_dir(root: Path) -> None:
    """An empty directory only this user can read (the copies of a previous process are stale)."""
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True, exist_ok=True)
    os.chmod(root, 0o700)


def stage(source: Path, into: Path) -> Path:
    """A hard link (a copy across file systems) of source inside `into`, where Gradio accepts files
    to serve without exposing the directory the source lives in."""
    into.mkdir(parents=True, exist_ok=True)
    target = into / source.name
    try:
        os.link(source, target)
    except FileExistsError:
        pass
    except OSError:
        shutil.copyfile(source, target)
    return target


def enforce_outputs(
    directory: Path,
    max_bytes: float | None,
    max_age_s: float | None,
    protected: set[str],
    now: float,
    min_age_s: float = 0.0,
) -> list[tuple[str, int]]:
    """Delete generated PNGs, oldest first, until those kept are younger than max_age_s and hold
    at most max_bytes in all; never a name in `protected` (a finished job's images, still to be
    fetched) nor a file younger than min_age_s (a response naming it may still be on its way, from
    this process or from another replica sharing the directory). Returns (name, size) per deletion."""
    if not directory.is_dir() or (max_bytes is None and max_age_s is None):
        return []
    files = []
    for path in directory.glob("*.png"):
        try:
            info = path.stat()
        except FileNotFoundError:
            continue
        files.append((info.st_mtime, path.name, info.st_size))
    files.sort()
    total = sum(size for _, _, size in files)
    deleted = []
    for mtime, name, size in files:
        too_old = max_age_s is not None and now - mtime > max_age_s
        too_big = max_bytes is not None and total > max_bytes
        if not (too_old or too_big):
            break  # oldest first: everything after this one is younger and fits
        if name in protected or now - mtime < min_age_s:
            continue
        try:
            (directory / name).unlink()
        except FileNotFoundError:
            pass
        total -= size
        deleted.append((name, size))
    return deleted
