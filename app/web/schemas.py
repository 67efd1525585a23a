"""Request and response models: the single source of input limits, for the API and the UI alike.

The request model is built from the configured limits at start, so the OpenAPI schema shows the
bounds this deployment really enforces. Messages say what is wrong and what would be accepted.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

SIZE_STEP = 64
SEED_MAX = 2**32 - 1  # torch generators take any int; 32 bits keeps seeds easy to copy and type
# Z-Image-Turbo is distilled for 8 transformer forwards. Since diffusers PR #13730 (0.42) n steps run
# n forwards on linspace(1, 1/n, n): 8 is the distilled schedule, 9 one extra forward off it (the
# model card's "9 steps" predates the fix). tests/app/test_schedule.py pins this.
TURBO_DEFAULT_STEPS = 8
TURBO_DEFAULT_CFG = 0.0
DEFAULT_SIZE = 1024


@dataclass(frozen=True)
class Limits:
    min_size: int = 256
    max_size: int = 2048
    max_steps: int = 50
    max_images: int = 4
    max_prompt_chars: int = 4000
    max_cfg: float = 20.0
    max_loras: int = 3

    @classmethod
    def from_settings(cls, settings) -> "Limits":
        return cls(
            min_size=settings.min_size,
            max_size=settings.max_size,
            max_steps=settings.max_steps,
            max_images=settings.max_images,
            max_prompt_chars=settings.max_prompt_chars,
            max_cfg=settings.max_cfg,
            max_loras=settings.max_loras,
        )

    def nearest_size(self, value: int) -> int:
        rounded = max(self.min_size, min(self.max_size, int(round(value / SIZE_STEP)) * SIZE_STEP))
        return rounded


class GenerateRequestBase(BaseModel):
    """Fields and checks shared by every deployment; limits come from the subclass made at start."""

    model_config = ConfigDict(extra="forbid", str_strip_whitespace=False)
    limits: ClassVar[Limits] = Limits()

    @field_validator("prompt", check_fields=False)
    @classmethod
    def _prompt_not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("prompt is empty; describe the image you want")
        if "\x00" in value:
            raise ValueError("prompt contains a NUL character")
        return value

    @field_validator("negative_prompt", check_fields=False)
    @classmethod
    def _negative_no_nul(cls, value: str) -> str:
        if "\x00" in value:
            raise ValueError("negative_prompt contains a NUL character")
        return value

    @field_validator("width", "height", check_fields=False)
    @classmethod
    def _size_multiple(cls, value: int, info) -> int:
        limits = cls.limits
        if value % SIZE_STEP:
            raise ValueError(
                f"{info.field_name} {value} is not a multiple of {SIZE_STEP}; "
                f"try {limits.nearest_size(value)}"
            )
        if not limits.min_size <= value <= limits.max_size:
            raise ValueError(
                f"{info.field_name} {value} is outside {limits.min_size}..{limits.max_size}; "
                f"try {limits.nearest_size(value)}"
            )
        return value


LORA_SCALE_MIN, LORA_SCALE_MAX = -4.0, 4.0


class LoraRef(BaseModel):
    """One LoRA a request names: a file of the server's lora_dir (GET /api/loras), and its weight."""

    model_config = ConfigDict(extra="forbid")
    name: str = Field(..., min_length=1, max_length=128, description="File stem under lora_dir.")
    scale: float = Field(
        1.0, ge=LORA_SCALE_MIN, le=LORA_SCALE_MAX, allow_inf_nan=False, description="0 off, 1 as trained."
    )


def build_request_model(limits: Limits) -> type[GenerateRequestBase]:
    """The POST /api/generate body for these limits."""
    frozen_limits = limits

    class GenerateRequest(GenerateRequestBase):
        limits: ClassVar[Limits] = frozen_limits
        prompt: str = Field(
            ..., max_length=limits.max_prompt_chars, description="What to draw (any language)."
        )
        negative_prompt: str = Field(
            "", max_length=limits.max_prompt_chars, description="What to avoid; used only when cfg_scale > 0."
        )
        width: int = Field(
            DEFAULT_SIZE, description=f"Multiple of 64 in {limits.min_size}..{limits.max_size}."
        )
        height: int = Field(
            DEFAULT_SIZE, description=f"Multiple of 64 in {limits.min_size}..{limits.max_size}."
        )
        num_inference_steps: int = Field(TURBO_DEFAULT_STEPS, ge=1, le=limits.max_steps)
        cfg_scale: float = Field(
            TURBO_DEFAULT_CFG,
            ge=0.0,
            le=limits.max_cfg,
            allow_inf_nan=False,
            description="Classifier-free guidance; Turbo is distilled to need none (0).",
        )
        num_images: int = Field(1, ge=1, le=limits.max_images)
        seed: int = Field(
            -1, ge=-1, le=SEED_MAX, description="-1 picks a random seed (returned in the response)."
        )
        response_format: Literal["url", "base64"] = Field(
            "url", description="Image URLs, or base64 PNGs inline."
        )
        init_image: Optional[str] = Field(
            None,
            description="Image-to-image: the start, base64 PNG/JPEG/WebP (resized to width×height).",
        )
        strength: float = Field(
            0.6,
            gt=0.0,
            le=1.0,
            allow_inf_nan=False,
            description="Image-to-image: how far from init_image (1: ignore it); ~strength × steps run.",
        )
        mask_image: Optional[str] = Field(
            None, description="Inpainting: white where to repaint, black where to keep; init_image's size."
        )

        loras: list[LoraRef] = Field(
            default_factory=list,
            max_length=limits.max_loras,
            description=f"Up to {limits.max_loras} LoRAs (GET /api/loras), merged for this request only.",
        )

        @model_validator(mode="after")
        def _mask_needs_an_image(self):
            if self.mask_image is not None and self.init_image is None:
                raise ValueError("mask_image needs init_image (inpainting repaints part of an image)")
            names = [lora.name for lora in self.loras]
            if len(set(names)) != len(names):
                raise ValueError("loras names one LoRA twice; give each once, with the sum of the scales")
            return self

    return GenerateRequest


class ImageOut(BaseModel):
    url: Optional[str] = None
    b64_png: Optional[str] = None
    filename: str
    width: int
    height: int


class Timings(BaseModel):
    queue_wait_s: float
    generation_s: float  # encode + denoise + decode of the batch this request ran in
    encode_s: Optional[float] = None
    denoise_s: Optional[float] = None
    decode_s: Optional[float] = None
    save_s: float
    total_s: float


class GenerateResponse(BaseModel):
    request_id: str
    seed: int
    images: list[ImageOut]
    width: int
    height: int
    num_inference_steps: int
    cfg_scale: float
    timings: Timings
    peak_memory_bytes: Optional[int] = None
    model: str


class ErrorResponse(BaseModel):
    error: str
    message: str
    request_id: Optional[str] = None
    hint: Optional[str] = None
