"""zimagectl bench on this machine (tiny model, CPU): the tool that makes docs/PERFORMANCE.md runs
end to end through the real app and prints its table, the lossy opt-ins' quality rows included."""

import json
import subprocess
import sys

import pytest

from ops.lab.bench import REPO

pytestmark = pytest.mark.integration


def test_bench_prints_the_table_with_stage_split_fp8_quality_and_start_up(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "ops.cli",
            "bench",
            "--phases",
            "latency,fp8,stepcache,coldstart",
            "--n",
            "2",
            "--home",
            str(tmp_path / "home"),
            "--images-dir",
            str(tmp_path / "img"),
            "--out",
            str(out),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    rows = {(r["event"], r.get("label")): r for r in json.loads(out.read_text())}
    default = rows[("latency", "default settings")]
    fp8 = rows[("latency", "opt-in quantize=fp8")]
    for row in (default, fp8):
        stages = row["encode_p50_s"] + row["denoise_p50_s"] + row["decode_p50_s"]
        assert 0 < stages <= row["pipeline_p50_s"] * 1.05 and row["e2e_p50_s"] >= row["pipeline_p50_s"]
    quality = rows[("quality", "fp8 vs default, same prompt and seed")]
    assert 30 < quality["psnr_db"] < float("inf")  # changed (FP8 ran), but only a little
    assert (tmp_path / "img" / "quality-fp8.png").stat().st_size > 0
    for label in ("bf16", "fp8"):  # the step cache, alone and on top of FP8: timed and quality-checked
        assert rows[("latency", f"opt-in {label} + step_cache_skips=2")]["e2e_p50_s"] > 0
        cached = rows[("quality", f"{label} + step cache vs default, same prompt and seed")]
        assert 20 < cached["psnr_db"] < float("inf")
    for ui in ("on", "off"):  # the start as deployed and the API alone, each with where the time went
        start = rows[("cold_start", f"default, UI {ui}, max_batch=1")]
        assert 0 < start["ready_s"] < 300 and start["first_image_s"] > 0
        assert start["breakdown"]["warmup_s"] >= 0 and "one_image_s" in start["breakdown"]["warmup_parts"]
    first = rows[("first_requests", None)]
    assert all(first[k] > 0 for k in ("long_prompt_s", "other_size_s", "two_images_s"))
    assert first["compiles_after_warmup"] == 0
    table = proc.stdout[proc.stdout.index("measurement") :]
    assert "latency 256²: opt-in quantize=fp8" in table and "quality: fp8 vs default" in table
    assert "start to ready: default, UI on" in table and "first requests after start" in table
