"""Code copied from diffusers says so with a marker: version, file, object and a hash of the object's
source. When the installed diffusers differs, this fails, so the copy is re-read against the new
source (and the marker updated) instead of silently diverging from the library it imitates."""

import hashlib
import importlib
import inspect
import re
from pathlib import Path

import diffusers
import pytest

REPO = Path(__file__).resolve().parents[2]
MARKER = re.compile(
    r"# Copied from diffusers (?P<version>\S+) (?P<path>diffusers/\S+\.py) (?P<qualname>\S+)"
    r" sha256:(?P<digest>[0-9a-f]{16})"
)


def markers() -> list[tuple[str, re.Match]]:
    found = []
    for path in sorted((REPO / "app").rglob("*.py")):
        for match in MARKER.finditer(path.read_text()):
            found.append((f"{path.relative_to(REPO)}:{match['qualname']}", match))
    return found


def source_digest(path: str, qualname: str) -> str:
    module = importlib.import_module(path.removesuffix(".py").replace("/", "."))
    obj = module
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return hashlib.sha256(inspect.getsource(inspect.unwrap(obj)).encode()).hexdigest()[:16]


def test_the_copies_are_marked():
    # The two copies we know of; a marker removed by accident would otherwise pass unnoticed.
    assert {m["qualname"] for _, m in markers()} >= {
        "ZSingleStreamAttnProcessor.__call__",
        "ZImagePipeline.__call__",
    }


@pytest.mark.parametrize("where, marker", markers(), ids=[w for w, _ in markers()])
def test_each_copy_matches_the_installed_diffusers(where, marker):
    assert diffusers.__version__ == marker["version"], (
        f"{where} was copied from diffusers {marker['version']}, {diffusers.__version__} is installed: "
        "compare the copy with the new source, then update the marker's version and hash"
    )
    assert source_digest(marker["path"], marker["qualname"]) == marker["digest"], (
        f"{marker['path']} {marker['qualname']} changed since {where} was copied: "
        "compare, then update the hash"
    )
