"""zimagectl drift on the tiny model (CPU): every lossy opt-in is compared with the default on the
same noise; the default against itself shows the comparison is exact."""

import json
import os
import subprocess
import sys

import pytest

from ops.lab.bench import REPO

pytestmark = pytest.mark.integration


def test_drift_rows_for_each_lossy_path_and_none_for_the_default_itself(tmp_path):
    out = tmp_path / "drift.json"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "ops.cli",
            "drift",
            "--seeds",
            "1",
            "--out",
            str(out),
            "--images-dir",
            str(tmp_path / "img"),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
        # an app configured with the lossy options: the tool still starts from the default
        env={**os.environ, "ZIMAGE_APP_QUANTIZE": "fp8", "ZIMAGE_APP_STEP_CACHE_SKIPS": "2"},
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    rows = {r["label"]: r for r in json.loads(out.read_text())}
    same = rows["default, again (determinism)"]
    assert same["contribution_changed_pct"] == 0 and same["max_abs_diff"] == 0
    cached, quant = rows["step cache (2 of 8 steps)"], rows["fp8"]
    both = rows["fp8 + step cache (2 of 8 steps)"]
    for row in (cached, quant, both):
        assert 0 < row["contribution_changed_pct"] < 25 and row["psnr_db_min"] > 30 and row["images"] == 2
    names = {p.name for p in (tmp_path / "img").iterdir()}  # two prompts, seed 0, each path: to look at
    assert {
        f"{path}-{prompt}-0.png"
        for path in ("default", "stepcache", "fp8", "fp8-stepcache")
        for prompt in (1, 2)
    } <= names
    # skipping the main layers at two steps moves the image more than rounding the weights to FP8
    assert cached["contribution_changed_pct"] > quant["contribution_changed_pct"]
