"""The app's one typed settings object: file section [app] + ZIMAGE_APP_* env, validated once at start."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal, Mapping, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from common.configfile import load_section, resolve_under
from common.contract import check_timeout_chain, supervisor_stopwaitsecs
from common.replicas import replica_index

OffloadMode = Literal["none", "model", "text-encoder"]
Switch = Literal["auto", "on", "off"]
DTypeName = Literal["auto", "bfloat16", "float16", "float32"]
# Inductor's modes that capture CUDA graphs, each with its twin that does not.
CUDA_GRAPH_MODES = {"reduce-overhead": "default", "max-autotune": "max-autotune-no-cudagraphs"}


class AppSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    home: Path = Path(".")  # set by the loader: $ZIMAGE_HOME or the checkout

    # Network: loopback unless the operator says otherwise.
    host: str = "127.0.0.1"
    port: int = Field(7860, ge=1, le=65535)

    # Model source: a local Z-Image-Turbo directory in diffusers layout, or None for the tiny demo.
    model_dir: Optional[Path] = None
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    dtype: DTypeName = "auto"  # auto: bfloat16 on GPU, float32 on CPU
    vae_dtype: DTypeName = "auto"  # auto: the pipeline dtype
    # A diffusers attention backend name (native, _native_cudnn, _native_flash, flash, _flash_3, ...).
    # native: PyTorch's SDPA, which inside the AOT packages already runs cuDNN's fused attention on
    # Hopper; "_native_cudnn" measured slower there (its layout copies break a fusion; docs/PERFORMANCE.md).
    attention_backend: str = "native"
    compile: Switch = "auto"  # torch.compile of the transformer; auto: on for CUDA, off on CPU
    # Inductor's mode. "reduce-overhead" and "max-autotune" add CUDA graphs to the jit-compiled blocks:
    # each block call replays one graph instead of launching its kernels one by one, so a step stops
    # waiting on the host's CPU where it is launch-bound (small images: 25.5 ms a step at 512² on an
    # H200 whatever the host's speed, 25.8-37.8 ms without; docs/PERFORMANCE.md). Each new shape
    # records its graphs in the request that brings it. Needs compile_backend = "jit" (an AOT package
    # is not a graph) and offload = "none"; not measured with parallel = "context" (NCCL in graphs).
    compile_mode: Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"] = (
        "default"
    )
    # How the transformer blocks are compiled. aot: exported once and compiled by AOTInductor into
    # packages under compile_cache_dir, which later starts load without tracing anything (the
    # start-up time; app/runtime/aot/); jit: torch.compile, re-traced by dynamo at every start. aot
    # falls back to jit where it cannot serve (a failed export, offload = "model").
    compile_backend: Literal["aot", "jit"] = "aot"
    # Shape handling of the compiled graphs. on: dynamic from the start, so the warm-up's graphs
    # serve every image size and prompt length; auto: static first, dynamic after the first change
    # (that change compiles inside a request); off: one graph per shape.
    compile_dynamic: Switch = "on"
    # After the warm-up, a shape no compiled graph covers runs eagerly (slower for that call) rather
    # than compiling inside a request (seconds, a minute with an empty cache). true: compile it.
    compile_in_requests: bool = False
    # What else compiles when compile is on (measured: docs/PERFORMANCE.md): the VAE decoder pays
    # (about twice as fast at 1024²); the text encoder does not (no reliable gain, more warm-up).
    compile_text_encoder: bool = False
    # The text encoder replayed from a CUDA graph per batch size (GPU, nothing offloaded): a new
    # prompt's encoding is launch-bound: more wall time than kernels (app/runtime/encoder_graph.py).
    text_encoder_graph: bool = True
    compile_vae: bool = True
    # Lossy, opt-in: FP8 (e4m3, per-row scales) linear layers in the transformer blocks; Hopper/Ada only
    # for speed (elsewhere it runs, emulated and slow). See app/runtime/fp8.py and the quality figure.
    quantize: Literal["none", "fp8"] = "none"
    # Lossy, opt-in: denoising steps at which the 30 main transformer layers do not run and the
    # residual they added at the step before is reused (app/runtime/stepcache.py; each saves ~10 % of a
    # 9-step image). 0: off. Never the first two steps, never the last, never two in a row.
    step_cache_skips: int = Field(0, ge=0, le=8)
    # Read transformer and text encoder with app/runtime/fastload.py (large reads, pinned buffers, straight
    # to the GPU, both at once) when nothing is offloaded; off: diffusers' from_pretrained for all.
    fast_load: bool = True
    compile_cache_dir: Path = Path("run/compile-cache")
    offload: OffloadMode = "none"
    max_batch: int = Field(1, ge=1, le=16)  # queued requests of one shape merged into one pipeline call
    memory_cap_gib: Optional[float] = Field(None, gt=0)  # per-process GPU memory cap (e.g. a 16 GiB card)
    ui: bool = True  # mount the Gradio UI at / (the JSON API works either way)
    # LoRA files (<name>.safetensors) a request may name, merged into the weights for it (hot, exact:
    # app/runtime/lora_merge.py). None: no LoRAs. lora_cache_size files stay loaded between requests;
    # max_loras: per request.
    lora_dir: Optional[Path] = None
    lora_cache_size: int = Field(4, ge=1, le=64)
    max_loras: int = Field(3, ge=1, le=8)

    # Warm-up before ready: one generation of this size (None: 1024 on GPU, 256 on CPU).
    warmup: bool = True
    warmup_size: Optional[int] = Field(None, ge=64, le=4096)
    warmup_steps: int = Field(2, ge=1, le=50)
    # After this many generations in a row fail with an unexplained error, make the warm-up image
    # again before answering; if that fails too, the engine calls itself unhealthy and is replaced,
    # and the request gets 503 + Retry-After instead of a 500 (0: never; app/runtime/selfcheck.py).
    self_check_after_failures: int = Field(1, ge=0, le=100)
    prompt_cache_size: int = Field(64, ge=0, le=4096)  # recent prompt embeddings kept on the GPU (re-rolls)

    # Input limits (the request schema is built from these).
    min_size: int = Field(256, ge=64)
    max_size: int = Field(2048, le=4096)
    max_steps: int = Field(50, ge=1, le=200)
    max_images: int = Field(4, ge=1, le=16)
    max_prompt_chars: int = Field(4000, ge=1, le=100_000)
    max_cfg: float = Field(20.0, ge=0)

    # Admission and lifecycle.
    queue_size: int = Field(8, ge=0, le=10_000)  # waiting requests beyond the one running
    # A generation may take request_timeout_s; a drain waits at least that long so it can finish,
    # and supervisord's stopwaitsecs (180) exceeds the drain so the drain is never cut short.
    request_timeout_s: float = Field(120.0, gt=0)
    drain_timeout_s: float = Field(150.0, ge=0)
    # A client's request head must arrive whole within this, and its body pause no longer (408 past
    # either; app/web/protocol.py): a connection left half-sent held a file descriptor for good.
    client_timeout_s: float = Field(30.0, gt=0, le=3600)

    # Outputs.
    outputs_dir: Path = Path("outputs")
    min_free_disk_mb: int = Field(100, ge=0)
    png_compress_level: int = Field(1, ge=0, le=9)
    # Retention of outputs/ (either, both or neither): oldest first, at start and every
    # retention_interval_s, never a file a live job still returns. The free-space check stays.
    outputs_max_gb: Optional[float] = Field(None, gt=0)
    outputs_max_age_days: Optional[float] = Field(None, gt=0)
    retention_interval_s: float = Field(300.0, ge=1)
    history_file: Path = Path("run/history.sqlite")  # the index behind GET /api/history
    jobs_kept: int = Field(1000, ge=1)  # finished jobs remembered for GET /api/jobs/{id}

    # Security (docs/SECURITY.md). api_token guards every route but the probes, /metrics and the
    # monitor's /admin/* (its own token): Authorization: Bearer <token>, or the UI's login cookie.
    # None: open, for the loopback default.
    api_token: Optional[str] = None
    # Set when users reach the UI over HTTPS (a TLS proxy in front): the login cookie is then Secure.
    session_cookie_secure: bool = False
    # Bodies are counted as they arrive, chunked or not: 413 at the first byte over the limit.
    # A generate body is a few KB; 1 MiB leaves room for 100k-character prompts.
    max_body_bytes: int = Field(2**20, ge=1024, le=2**30)
    max_upload_mb: int = Field(50, ge=1, le=4096)  # image uploads (Gradio's upload route) get their own
    # Gradio's copies of the images it shows (and of uploads): under run/, removed at start and
    # after gradio_cache_max_age_s, so they follow the service, not /tmp.
    gradio_temp_dir: Path = Path("run/gradio")
    gradio_cache_max_age_s: int = Field(3600, ge=60)
    admin_token: Optional[str] = None  # for /admin/*; None: read or create admin_token_file
    admin_token_file: Path = Path("run/admin.token")
    fault_injection: bool = False  # /admin/fault exists only when true (and needs the admin token)

    log_level: Literal["debug", "info", "warning", "error"] = "info"

    # One app per GPU behind HAProxy (docs/SCALING.md): N, or "auto" for one per visible GPU. With
    # N > 1 HAProxy takes `port` and replica i listens on replica_base_port + i (common/replicas.py).
    replicas: Union[int, Literal["auto"]] = 1
    replica_base_port: int = Field(7870, ge=1, le=65535)
    balancer_stats_port: int = Field(7869, ge=1, le=65535)  # HAProxy's stats and /metrics, on loopback

    # One image on several GPUs (docs/SCALING.md): "context" runs the transformer with diffusers'
    # context parallelism over parallel_degree processes, one GPU each (the first parallel_degree of
    # CUDA_VISIBLE_DEVICES), started by python -m app (app/ranks.py). Latency, not throughput:
    # replicas make more images per hour from the same GPUs (docs/PERFORMANCE.md).
    parallel: Literal["none", "context"] = "none"
    parallel_degree: int = Field(2, ge=2, le=8)
    # How the split blocks' attention exchanges heads and tokens between two ranks. "diffusers": its
    # Ulysses, each exchange waited for where it is issued; "overlapped": each half sent as soon as
    # it is computed and waited for where it is read, so the transfers run under the projections
    # (app/runtime/ulysses.py; the same image within bf16 noise). More than two ranks: diffusers'.
    parallel_attention: Literal["diffusers", "overlapped"] = "diffusers"

    @field_validator("model_dir", mode="before")
    @classmethod
    def _empty_is_none(cls, value):
        if value in ("", "tiny", "none", None):
            return None
        return value

    @field_validator("api_token", "admin_token", mode="before")
    @classmethod
    def _empty_token_is_none(cls, value):
        return value or None

    @field_validator("device")
    @classmethod
    def _check_device(cls, value: str) -> str:
        if value in ("auto", "cpu", "cuda") or (value.startswith("cuda:") and value[5:].isdigit()):
            return value
        raise ValueError(f"device {value!r} is not one of auto, cpu, cuda, cuda:N")

    @model_validator(mode="after")
    def _check_limits(self):
        for name in ("min_size", "max_size"):
            if getattr(self, name) % 64:
                raise ValueError(f"{name} {getattr(self, name)} is not a multiple of 64")
        if self.parallel == "context":
            # Each is a per-rank decision the ranks would have to make identically, or a second way
            # to use the same GPUs: refused rather than half-supported.
            if self.replicas != 1:
                raise ValueError("parallel = 'context' uses several GPUs for one app: set replicas = 1")
            if self.offload != "none":
                raise ValueError("parallel = 'context' needs offload = 'none' (each rank holds the model)")
            if self.step_cache_skips:
                raise ValueError("parallel = 'context' does not combine with step_cache_skips")
        if self.compile_mode in CUDA_GRAPH_MODES:
            for needed, have, why in (
                (
                    "compile_backend = 'jit'",
                    self.compile_backend == "jit",
                    "AOT packages are not CUDA graphs",
                ),
                ("offload = 'none'", self.offload == "none", "a graph keeps the addresses of its weights"),
                ("parallel = 'none'", self.parallel == "none", "collectives inside graphs are not measured"),
            ):
                if not have:
                    raise ValueError(f"compile_mode = {self.compile_mode!r} needs {needed} ({why})")
        if self.lora_dir is not None and self.quantize == "fp8":
            # An FP8 layer holds its weight quantized with per-row scales: a LoRA merged into it would
            # be requantized at every switch (lossy twice) — refused rather than quietly degraded.
            raise ValueError(
                "lora_dir does not combine with quantize = 'fp8' (LoRAs merge into bf16 weights)"
            )
        if self.min_size > self.max_size:
            raise ValueError(f"min_size {self.min_size} is larger than max_size {self.max_size}")
        if self.model_dir is not None:
            self.model_dir = resolve_under(self.home, self.model_dir)
            if not (self.model_dir / "model_index.json").is_file():
                raise ValueError(
                    f"model_dir {self.model_dir} has no model_index.json; point it at a Z-Image-Turbo "
                    "directory in diffusers layout, or leave it empty for the demo model"
                )
        self.outputs_dir = resolve_under(self.home, self.outputs_dir)
        self.admin_token_file = resolve_under(self.home, self.admin_token_file)
        self.compile_cache_dir = resolve_under(self.home, self.compile_cache_dir)
        self.gradio_temp_dir = resolve_under(self.home, self.gradio_temp_dir)
        self.history_file = resolve_under(self.home, self.history_file)
        if self.lora_dir is not None:
            self.lora_dir = resolve_under(self.home, self.lora_dir)
            if not self.lora_dir.is_dir():
                raise ValueError(f"lora_dir {self.lora_dir} is not a directory")
        return self

    def warmup_pixels(self, device_type: str) -> int:
        """The warm-up image's side: warmup_size, or 1024 on a GPU and 256 on a CPU (a multiple of 64)."""
        size = self.warmup_size or (1024 if device_type == "cuda" else 256)
        return max(64, size - size % 64)

    @property
    def gradio_cache_dir(self) -> Path:
        """This process's Gradio temp dir: one per port, so apps sharing a home never wipe each other's."""
        return self.gradio_temp_dir / f"port-{self.port}"

    @property
    def is_demo_model(self) -> bool:
        return self.model_dir is None

    @property
    def local_url(self) -> str:
        """Where a process on this host reaches the app (a wildcard bind is reached on loopback)."""
        host = "127.0.0.1" if self.host in ("0.0.0.0", "::", "") else self.host
        return f"http://{host}:{self.port}"


def load_settings(env: Mapping[str, str] | None = None, **overrides) -> AppSettings:
    env = os.environ if env is None else env
    settings = load_section(AppSettings, "app", env, overrides)
    index = replica_index(env)
    if index is not None and "port" not in overrides:  # a replica listens on its own port
        settings.port = settings.replica_base_port + index
    check_timeout_chain(settings.request_timeout_s, settings.drain_timeout_s, supervisor_stopwaitsecs())
    return settings
