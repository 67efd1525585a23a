"""Image-to-image and inpainting beside text-to-image, side by side in one app, one run:

    python -m ops.lab.img2img_check --model-dir /tmp/zimage-full --compile off

e2e p50 of each mode at --size (default 1024²), 8 steps, strength 0.6 for image-to-image and 1.0
for inpainting (half the image masked), and torch's allocated GPU memory after each (the variants
share the loaded modules: it must not grow). One JSON line per row.
"""

from __future__ import annotations

import argparse
import base64
import io
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from ops.lab.bench_app import PROMPT, AppRun, emit
from ops.lab.bench_reference import ensure_model_dir
from ops.tempstack import free_port


def b64_png(image: Image.Image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model-dir", required=True)
    parser.add_argument("--reference", default=".bench/zimage_gpu_baseline.py")
    parser.add_argument("--compile", default="off")
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--n", type=int, default=6)
    args = parser.parse_args(argv)
    ensure_model_dir(args.model_dir, args.reference)
    home = Path(tempfile.mkdtemp(prefix="img2img-"))
    app = AppRun(
        free_port(), home, model_dir=args.model_dir, compile=args.compile, max_body_bytes=2**30, min_size=64
    )
    results: list = []
    try:
        emit(results, event="ready", seconds=round(app.wait_ready(), 1))
        size = args.size
        ramp = np.linspace(0, 255, size * size * 3, dtype=np.uint8).reshape(size, size, 3)
        init = b64_png(Image.fromarray(ramp))
        mask = np.zeros((size, size), dtype=np.uint8)
        mask[:, size // 2 :] = 255
        modes = {
            "text2img": {},
            "img2img, strength 0.6": {"init_image": init, "strength": 0.6},
            "inpaint, strength 1.0, half masked": {
                "init_image": init,
                "mask_image": b64_png(Image.fromarray(mask)),
                "strength": 1.0,
            },
        }
        for label, extra in modes.items():
            app.generate(size, seed=999, **extra)  # its first call (the variant is made here)
            e2e, pipeline = [], []
            for i in range(args.n):
                t0 = time.perf_counter()
                body = app.generate(size, seed=i, prompt=f"{PROMPT}, variation {i}", **extra)
                e2e.append(time.perf_counter() - t0)
                pipeline.append(body["timings"]["generation_s"])
            memory = app.client.get(app.url + "/api/info").json()["live"].get("torch_allocated_bytes")
            emit(
                results,
                event="mode",
                label=label,
                size=size,
                n=args.n,
                e2e_p50_s=round(statistics.median(e2e), 3),
                pipeline_p50_s=round(statistics.median(pipeline), 3),
                allocated_gib=None if memory is None else round(memory / 2**30, 3),
                peak_gib=round((body.get("peak_memory_bytes") or 0) / 2**30, 2),
            )
    finally:
        app.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
