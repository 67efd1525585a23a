"""LoRA files for the tests, made offline with peft the way a trainer makes them: adapters injected
into a model (the tiny Z-Image transformer, or another model for a file that does not fit), their
state dict saved through diffusers' ZImagePipeline.save_lora_weights with peft's config beside it."""

from __future__ import annotations

from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model
from torch import nn

from app.runtime.tiny import build_tiny_pipeline

ATTENTION = ["to_q", "to_k", "to_v", "to_out.0"]


def save(directory: Path, name: str, state_dict: dict, config: LoraConfig | None) -> Path:
    from diffusers import ZImagePipeline

    directory.mkdir(parents=True, exist_ok=True)
    ZImagePipeline.save_lora_weights(
        directory,
        transformer_lora_layers=state_dict,
        transformer_lora_adapter_metadata=None if config is None else config.to_dict(),
        weight_name=f"{name}.safetensors",
    )
    return directory / f"{name}.safetensors"


def make_lora(
    directory: Path,
    name: str,
    seed: int = 0,
    rank: int = 4,
    alpha: float = 8,
    targets: list[str] = ATTENTION,
    magnitude: float = 0.05,
) -> Path:
    """A peft LoRA for the tiny model's transformer with random (not zero) factors, so it changes
    the image; alpha ≠ rank, so the scaling alpha/r is exercised."""
    transformer = build_tiny_pipeline().transformer
    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets, init_lora_weights=False)
    inject_adapter_in_model(config, transformer, adapter_name="default")
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for pname, param in transformer.named_parameters():
            if "lora_" in pname:
                param.copy_(torch.randn(param.shape, generator=generator) * magnitude)
    return save(directory, name, get_peft_model_state_dict(transformer, adapter_name="default"), config)


class _OtherModel(nn.Module):
    """Not Z-Image: a LoRA trained on it has keys no Z-Image layer has."""

    def __init__(self):
        super().__init__()
        self.down_blocks = nn.ModuleList([nn.ModuleDict({"proj_in": nn.Linear(32, 32)}) for _ in range(2)])


def make_foreign_lora(directory: Path, name: str) -> Path:
    model = _OtherModel()
    config = LoraConfig(r=2, lora_alpha=2, target_modules=["proj_in"], init_lora_weights=False)
    inject_adapter_in_model(config, model, adapter_name="default")
    return save(directory, name, get_peft_model_state_dict(model, adapter_name="default"), config)


def make_wrong_size_lora(directory: Path, name: str) -> Path:
    """Right names, wrong shapes: as if trained for another size of Z-Image (in_features + 8)."""
    transformer = build_tiny_pipeline().transformer
    layer = transformer.get_submodule("layers.0.attention.to_q")
    state = {
        "layers.0.attention.to_q.lora_A.weight": torch.randn(4, layer.in_features + 8),
        "layers.0.attention.to_q.lora_B.weight": torch.randn(layer.out_features, 4),
    }
    return save(directory, name, state, None)
