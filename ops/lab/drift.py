"""zimagectl drift: how far each lossy opt-in moves an image away from the default, same prompt and seed.

    python -m ops.lab.drift --model-dir /path/to/Z-Image-Turbo [--size 1024] [--seeds 2] [--images-dir drift/]

One pipeline is loaded (eager: compiling changes no figure here), then each path generates the
same prompts from the same starting noise: the default (bf16), the step cache, FP8, FP8 with the
step cache. Two figures per path:
- image PSNR against the default's image (and its largest pixel difference);
- the model's contribution changed: |x_path − x_default| / |x_default − x_noise| over the final
  latents, where x_noise is the starting noise. Pixel PSNR alone misleads on a random-weight
  model, whose small velocities leave every image close to decoded noise so that any path scores
  ~50 dB; this ratio says which share of what the transformer added to the image moved, on random
  and real weights alike.
Without a GPU it runs on the tiny demo model (FP8 emulated), so the tool is tested everywhere.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from ops.lab.bench_app import psnr

PROMPTS = (
    "a lighthouse on a cliff at dusk, oil painting",
    "a red fox in fresh snow, photograph, morning light",
)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="zimagectl drift", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--model-dir",
        default=None,
        help="a Z-Image-Turbo directory (default: the configured app.model_dir, else the demo model)",
    )
    parser.add_argument(
        "--size", type=int, default=None, help="image side (default 1024 on a GPU, 128 on a CPU)"
    )
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--seeds", type=int, default=2, help="seeds per prompt")
    parser.add_argument("--skips", type=int, default=2, help="step_cache_skips of the step-cache paths")
    parser.add_argument(
        "--images-dir",
        type=Path,
        default=None,
        help="write every path's images here (default-1-0.png, fp8-1-0.png, ...: prompt, seed) to look at",
    )
    parser.add_argument("--out", default=None, help="write the rows as JSON here")
    args = parser.parse_args(argv)

    import torch

    from app.config import load_settings
    from app.runtime import fp8, stepcache
    from app.runtime.loader import load_pipeline
    from app.runtime.stages import PromptEmbeddingCache, decode_to_pil, encode

    # The app's own config (model, device, dtype, offload), from the default path: no lossy option on
    # (this tool adds them one by one), nothing compiled, no warm-up.
    overrides = {
        "compile": "off",
        "warmup": False,
        "text_encoder_graph": False,
        "quantize": "none",
        "step_cache_skips": 0,
    }
    if args.model_dir:
        overrides["model_dir"] = args.model_dir
    settings = load_settings(**overrides)
    loaded = load_pipeline(settings)
    pipe, device = loaded.pipe, loaded.exec_device
    size = args.size or (1024 if device.type == "cuda" else 128)
    cache = stepcache.StepCache(0)
    stepcache.install(pipe.transformer, cache)
    embeddings = encode(pipe, list(PROMPTS), device, PromptEmbeddingCache(0))
    channels = pipe.transformer.config.in_channels
    scale = pipe.vae_scale_factor * 2

    def noise(seed: int) -> torch.Tensor:  # the latents' shape as ZImagePipeline.prepare_latents makes it
        generator = torch.Generator("cpu").manual_seed(seed)
        return torch.randn((1, channels, size // scale * 2, size // scale * 2), generator=generator).to(
            device, loaded.dtype
        )

    def generate(skips: int) -> list[tuple[torch.Tensor, torch.Tensor, np.ndarray]]:
        cache.skips = skips
        outputs = []
        for embedding in embeddings:
            for seed in range(args.seeds):
                start = noise(seed)
                cache.begin(args.steps)
                try:
                    with torch.inference_mode():
                        latents = pipe(
                            prompt_embeds=[embedding],
                            height=size,
                            width=size,
                            num_inference_steps=args.steps,
                            guidance_scale=0.0,
                            latents=start.clone(),
                            output_type="latent",
                            callback_on_step_end=lambda _p, _i, _t, kw: (cache.end_step(), kw)[1],
                        ).images
                        image = np.asarray(decode_to_pil(pipe, latents)[0])
                finally:
                    cache.end()
                outputs.append((start.float(), latents.float(), image))
        return outputs

    rows = []
    default = generate(0)

    def save(name: str, outputs) -> None:
        if args.images_dir:
            from PIL import Image

            args.images_dir.mkdir(parents=True, exist_ok=True)
            for index, (_, _, image) in enumerate(outputs):
                prompt, seed = divmod(index, args.seeds)
                Image.fromarray(image).save(args.images_dir / f"{name}-{prompt + 1}-{seed}.png")

    save("default", default)

    def compare(label: str, name: str, outputs) -> None:
        save(name, outputs)
        moved = [
            float((lat - ref_lat).norm() / (ref_lat - start).norm())
            for (start, ref_lat, _), (_, lat, _) in zip(default, outputs)
        ]
        psnrs = [psnr(ref_img, img) for (_, _, ref_img), (_, _, img) in zip(default, outputs)]
        largest = max(
            int(np.abs(ref.astype(int) - img.astype(int)).max())
            for (_, _, ref), (_, _, img) in zip(default, outputs)
        )
        row = {
            "event": "drift",
            "label": label,
            "size": size,
            "steps": args.steps,
            "images": len(outputs),
            "contribution_changed_pct": round(100 * float(np.mean(moved)), 2),
            "contribution_changed_max_pct": round(100 * max(moved), 2),
            "psnr_db_min": round(min(psnrs), 1),
            "max_abs_diff": largest,
        }
        rows.append(row)
        print(json.dumps(row), flush=True)

    compare("default, again (determinism)", "default-again", generate(0))
    compare(f"step cache ({args.skips} of {args.steps} steps)", "stepcache", generate(args.skips))
    fp8.quantize_transformer(pipe.transformer, min_features=min(512, pipe.transformer.config.dim))
    compare("fp8", "fp8", generate(0))
    compare(f"fp8 + step cache ({args.skips} of {args.steps} steps)", "fp8-stepcache", generate(args.skips))
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
