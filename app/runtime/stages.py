"""One batch through the pipeline in three timed stages: encode prompts → denoise → decode to images.

The engine used to make one `pipe(prompt=...)` call. Splitting it here (the same diffusers calls the
pipeline makes, in the same order) buys three things: a per-stage time for every request (API
timings, the bench's breakdown), each distinct prompt encoded once — a batch of 4 images of one
prompt used to run the 4-billion-parameter text encoder 4 times — with a small LRU of recent
embeddings for re-rolls of the same prompt, and the float→uint8 conversion on the GPU instead of
in numpy on the host (same operations, same bytes as diffusers' postprocess).
"""

from __future__ import annotations

import copy
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from PIL import Image

from app.runtime.jobs import GenerationParams


class PromptEmbeddingCache:
    """prompt text → text-encoder embedding (on the GPU), least recently used dropped first.
    Embeddings depend only on the text (the model is fixed for the process's lifetime). Used by the
    engine thread; cleared from others (free-cache under memory pressure), hence the lock."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self._items: OrderedDict[str, torch.Tensor] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def get(self, prompt: str) -> Optional[torch.Tensor]:
        with self._lock:
            value = self._items.get(prompt)
            if value is not None:
                self._items.move_to_end(prompt)
                self.hits += 1
            return value

    def put(self, prompt: str, embedding: torch.Tensor) -> None:
        if self.capacity <= 0:
            return
        with self._lock:
            self._items[prompt] = embedding
            self._items.move_to_end(prompt)
            while len(self._items) > self.capacity:
                self._items.popitem(last=False)

    def clear(self) -> None:
        with self._lock:
            self._items.clear()

    def __len__(self) -> int:
        return len(self._items)


def uses_guidance(cfg_scale: float) -> bool:
    """Whether the pipeline runs classifier-free guidance, and so needs negative embeddings. Z-Image
    guides as pos + s·(pos − neg) at any s > 0 (diffusers' ZImagePipeline.do_classifier_free_guidance),
    not only above 1 as Stable Diffusion's pipelines do; a request at 0 < s ≤ 1 without negatives
    failed inside the pipeline (a 500, found by the hostile-bodies test)."""
    return cfg_scale > 0


@dataclass
class BatchRequest:
    prompts: list[str]  # one per image
    negatives: Optional[list[str]]  # one per image when uses_guidance(cfg_scale), else None
    width: int
    height: int
    num_inference_steps: int
    cfg_scale: float
    generators: list[torch.Generator]
    init_images: Optional[list] = None  # image-to-image: one PIL image per image, at width×height
    mask_images: Optional[list] = None  # inpainting: one "L" mask per image (white repaints)
    strength: float = 1.0
    loras: tuple = ()  # ((name, scale), …) merged for this call; the caller merges (LoraSet.apply)


def batch_request(params: list[GenerationParams]) -> tuple[BatchRequest, list[int]]:
    """One pipeline call for requests that batch together (JobQueue's batch_key: same size, steps,
    cfg, LoRAs, and an image-to-image request alone), and each image's seed."""
    first = params[0]
    prompts, negatives, seeds = [], [], []
    for p in params:
        for i in range(p.num_images):
            prompts.append(p.prompt)
            negatives.append(p.negative_prompt)
            seeds.append((p.seed + i) % 2**63)
    request = BatchRequest(
        prompts=prompts,
        negatives=negatives if uses_guidance(first.cfg_scale) else None,
        width=first.width,
        height=first.height,
        num_inference_steps=first.num_inference_steps,
        cfg_scale=first.cfg_scale,
        # One CPU generator per image, seeded seed+i: an image depends on its request only, never
        # on what it was batched with, and a seed gives the same picture on CPU and GPU.
        generators=[torch.Generator("cpu").manual_seed(seed) for seed in seeds],
        init_images=None if first.init_image is None else [first.init_image] * len(prompts),
        mask_images=None if first.mask_image is None else [first.mask_image] * len(prompts),
        strength=first.strength,
        loras=first.loras,
    )
    return request, seeds


def _encode_in_vae_dtype(vae) -> None:
    """diffusers' image-to-image pipelines hand the VAE the image in the transformer's dtype (bf16),
    while this service may keep the VAE in fp32 (vae_dtype): the encoder's convolution then refuses
    the input. The image goes in in the VAE's dtype, and the latent distribution comes back in the
    caller's, so the rest of the pipeline sees what it expects. Once per VAE; decode is untouched."""
    if getattr(vae, "_zimage_encode_cast", False):
        return
    encode = vae.encode

    def encode_cast(x, *args, **kwargs):
        out = encode(x.to(vae.dtype), *args, **kwargs)
        dist = out.latent_dist
        for name in ("parameters", "mean", "logvar", "std", "var"):
            if isinstance(getattr(dist, name, None), torch.Tensor):
                setattr(dist, name, getattr(dist, name).to(x.dtype))
        return out

    vae.encode = encode_cast
    vae._zimage_encode_cast = True


def pipeline_for(pipe, request: BatchRequest):
    """The pipeline that runs `request`: the loaded one, or its image-to-image / inpainting sibling
    made once from the same modules (transformer, VAE, text encoder, compiled or not): no second
    copy of any weight. Not with from_pipe: in diffusers 0.42 it ends with `.to(dtype=float32)`
    when given no dtype, which cast the shared bf16 transformer and text encoder to fp32 in place
    (19 GiB more and 4.8× slower on the H200, for every request after the first image-to-image)."""
    if request.init_images is None:
        return pipe, {}
    kind = "inpaint" if request.mask_images is not None else "img2img"
    variants = pipe.__dict__.setdefault("_zimage_variants", {})
    if kind not in variants:
        from diffusers import ZImageImg2ImgPipeline, ZImageInpaintPipeline

        cls = ZImageInpaintPipeline if kind == "inpaint" else ZImageImg2ImgPipeline
        _encode_in_vae_dtype(pipe.vae)
        # (its own scheduler: image-to-image sets a begin index on it)
        components = {**pipe.components, "scheduler": copy.deepcopy(pipe.scheduler)}
        variants[kind] = cls(**components)
        variants[kind].set_progress_bar_config(disable=True)
    extra = {"image": request.init_images, "strength": request.strength}
    if kind == "inpaint":
        extra["mask_image"] = request.mask_images
    return variants[kind], extra


def encode(pipe, texts: list[str], device: torch.device, cache: PromptEmbeddingCache) -> list[torch.Tensor]:
    """Embeddings for `texts`, in order; each distinct text not in the cache is encoded once, all in
    one call."""
    found = {t: cache.get(t) for t in dict.fromkeys(texts)}
    missing = [t for t, e in found.items() if e is None]
    if missing:
        cache.misses += len(missing)
        # (a copy: diffusers rewrites the list it is given in place with the chat template applied)
        embeddings, _ = pipe.encode_prompt(
            prompt=list(missing), device=device, do_classifier_free_guidance=False
        )
        for text, embedding in zip(missing, embeddings):
            found[text] = embedding
            cache.put(text, embedding)
    return [found[t] for t in texts]


# Copied from diffusers 0.42.1 diffusers/pipelines/z_image/pipeline_z_image.py ZImagePipeline.__call__ sha256:f155a54e340b1240  # noqa: E501
# (its decode and postprocess only; tests/app/test_copied_from.py fails when the installed source differs)
def decode_to_pil(pipe, latents: torch.Tensor) -> list[Image.Image]:
    """The pipeline's own decode and postprocess (VaeImageProcessor: x/2+0.5, clamp, float, ×255,
    round), with the rounding done on the GPU so only uint8 pixels cross to the host.
    One image at a time: at 1024² a decode is compute-bound, so a batch gains nothing, while it
    needs a compiled decoder graph of its own (seconds more warm-up per start; docs/PERFORMANCE.md)
    and several GiB of activations per image at once."""
    vae = pipe.vae
    latents = latents.to(vae.dtype) / vae.config.scaling_factor + vae.config.shift_factor
    images = []
    for one in latents.split(1):
        image = vae.decode(one, return_dict=False)[0]
        pixels = ((image / 2 + 0.5).clamp(0, 1).float() * 255).round().to(torch.uint8)
        images.append(Image.fromarray(pixels[0].permute(1, 2, 0).contiguous().cpu().numpy()))
    return images


def run_batch(
    pipe,
    request: BatchRequest,
    device: torch.device,
    cache: PromptEmbeddingCache,
    on_step_end: Optional[Callable] = None,
    on_stage: Callable[[str], None] = lambda stage: None,
) -> tuple[list[Image.Image], dict[str, float]]:
    """Images for `request` and the seconds each stage took (the GPU is synchronised between stages
    so the figures are the GPU's, not the launch queue's). on_stage(name) is told as each stage begins."""
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    on_stage("encode")
    t0 = time.perf_counter()
    prompt_embeds = encode(pipe, request.prompts, device, cache)
    negative_embeds = encode(pipe, request.negatives, device, cache) if request.negatives else None
    sync()
    t1 = time.perf_counter()
    on_stage("denoise")
    runner, extra = pipeline_for(pipe, request)
    latents = runner(
        **extra,
        prompt_embeds=prompt_embeds,
        negative_prompt_embeds=negative_embeds,
        height=request.height,
        width=request.width,
        num_inference_steps=request.num_inference_steps,
        guidance_scale=request.cfg_scale,
        num_images_per_prompt=1,
        generator=request.generators,
        callback_on_step_end=on_step_end,
        output_type="latent",
    ).images
    sync()
    t2 = time.perf_counter()
    on_stage("decode")
    images = decode_to_pil(pipe, latents)
    t3 = time.perf_counter()
    return images, {"encode_s": t1 - t0, "denoise_s": t2 - t1, "decode_s": t3 - t2}
