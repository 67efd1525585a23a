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
