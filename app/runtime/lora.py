"""LoRA files: the configured directory's listing, and one file read and checked against the
transformer it is meant for (app/runtime/lora_merge.py puts it into the weights).

A file is named by its stem (`<lora_dir>/<name>.safetensors`); a name is a plain word, so no request
can reach outside the directory. Reading goes through diffusers' ZImageLoraLoaderMixin.lora_state_dict,
which converts the other trainers' layouts (kohya `lora_unet_`, ComfyUI `diffusion_model.`, alphas
folded into the factors) to diffusers' `transformer.<module>.lora_A/B.weight`. diffusers itself only
warns when keys match no module and loads the rest (the image then quietly lacks the LoRA); here
every key must name a linear layer of this transformer with the factor shapes it needs, or the file
is refused, naming the first keys that do not fit."""

from __future__ import annotations

import math
import re
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from app import errors

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"
_NAME = re.compile(NAME_PATTERN)
SUFFIX = ".safetensors"
SHOWN_KEYS = 5  # unmatched keys named in a refusal
_FACTOR = re.compile(r"^(?P<module>.+)\.lora_(?P<kind>A|B)\.weight$")


@dataclass(frozen=True)
class LoraFile:
    name: str
    path: Path
    size_bytes: int
    mtime_ns: int

    @property
    def version(self) -> tuple[int, int]:
        """What tells a replaced file from the one loaded before (same name)."""
        return (self.size_bytes, self.mtime_ns)


@dataclass
class ModuleFactors:
    """One linear layer's low-rank update: ΔW = scaling · B @ A (A: r×in, B: out×r)."""

    down: torch.Tensor  # A
    up: torch.Tensor  # B
    scaling: float


@dataclass
class LoraWeights:
    file: LoraFile
    modules: dict[str, ModuleFactors]  # transformer module path → factors

    @property
    def nbytes(self) -> int:
        return sum(f.down.nbytes + f.up.nbytes for f in self.modules.values())


class LoraLibrary:
    """The files under lora_dir (not its subfolders); listed fresh on every call, so a file copied
    in is usable at once and a removed one is refused at once."""

    def __init__(self, root: Path):
        self.root = Path(root)

    def files(self) -> list[LoraFile]:
        found = []
        try:
            entries = sorted(self.root.iterdir())
        except OSError:
            return []
        for path in entries:
            if path.suffix != SUFFIX or not _NAME.match(path.stem):
                continue
            info = _stat(path)
            if info is not None:
                found.append(info)
        return found

    def find(self, name: str) -> LoraFile:
        """The file for `name`, or UnknownLora (a 422 naming what is there)."""
        if not _NAME.match(name):
            raise errors.UnknownLora(
                f"LoRA name {name[:80]!r} is not a plain file name (letters, digits, ._-)"
            )
        info = _stat(self.root / f"{name}{SUFFIX}")
        if info is None:
            names = [f.name for f in self.files()]
            shown = ", ".join(names[:10]) + (" …" if len(names) > 10 else "")
            raise errors.UnknownLora(
                f"no LoRA named {name!r} in the LoRA directory",
                hint=f"available: {shown}"
                if names
                else "the LoRA directory is empty; GET /api/loras lists them",
            )
        return info


def _stat(path: Path) -> Optional[LoraFile]:
    try:
        st = path.stat()
    except OSError:
        return None
    if not stat.S_ISREG(st.st_mode):  # (a folder named like a file is not one)
        return None
    return LoraFile(path.stem, path, st.st_size, st.st_mtime_ns)


def read_state_dict(file: LoraFile) -> tuple[dict[str, torch.Tensor], dict]:
    """diffusers' reading (layout conversion, alphas folded) of the file: (tensors, metadata)."""
    from diffusers import ZImagePipeline

    try:
        # safetensors only, never the hub: said outright, though a local *.safetensors path already
        # takes diffusers' safetensors branch (a file that is not one fails there; checked).
        state_dict, metadata = ZImagePipeline.lora_state_dict(
            str(file.path), return_lora_metadata=True, use_safetensors=True, local_files_only=True
        )
    except FileNotFoundError:
        raise errors.UnknownLora(f"LoRA {file.name!r} was removed from the LoRA directory") from None
    except Exception as exc:  # safetensors' own errors: a truncated or foreign file
        why = str(exc).replace(str(file.path), file.path.name)[:200]  # (no server paths to clients)
        raise errors.InvalidLora(
            f"LoRA {file.name!r} could not be read as safetensors: {exc.__class__.__name__}: {why}"
        ) from None
    return state_dict, metadata or {}


def _transformer_metadata(metadata: dict) -> dict:
    """The adapter config diffusers saved beside the weights (peft's LoraConfig as a dict), if any."""
    prefix = "transformer."
    return {k[len(prefix) :]: v for k, v in metadata.items() if k.startswith(prefix)}


def _alpha_for(module: str, rank: int, config: dict) -> float:
    """peft's rule for a module's scaling: alpha/r (alpha/√r with rsLoRA), alpha from alpha_pattern
    where a pattern matches the module's name, else lora_alpha (peft's default 8). A file without a
    saved config has its alphas folded into the factors already: scaling 1 (diffusers' convention)."""
    if not config:
        return 1.0
    alpha = config.get("lora_alpha", 8)
    for pattern, value in (config.get("alpha_pattern") or {}).items():
        if re.match(rf"(.*\.)?({pattern})$", module):
            alpha = value
            break
    return alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank


def check_and_split(
    name: str, state_dict: dict[str, torch.Tensor], metadata: dict, transformer: nn.Module
) -> dict[str, ModuleFactors]:
    """The file's factors per transformer module, or InvalidLora naming the first keys that do not
    fit this transformer (no such linear layer, or factor shapes that are not its in/out sizes)."""
    config = _transformer_metadata(metadata)
    if config.get("use_dora") or config.get("lora_bias") or config.get("fan_in_fan_out"):
        raise errors.InvalidLora(
            f"LoRA {name!r} uses DoRA, a LoRA bias or fan-in-fan-out; only plain LoRA is served"
        )
    if not state_dict:
        raise errors.InvalidLora(f"LoRA {name!r} holds no LoRA weights for the transformer")
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    unmatched: list[str] = []
    for key, tensor in state_dict.items():
        found = _FACTOR.match(key.removeprefix("transformer."))
        if found is None:
            unmatched.append(key)  # (LoKr, DoRA, biases, a text encoder's keys: nothing we merge)
            continue
        pairs.setdefault(found["module"], {})[found["kind"]] = tensor
    modules: dict[str, ModuleFactors] = {}
    for module, factors in pairs.items():
        layer = _linear(transformer, module)
        down, up = factors.get("A"), factors.get("B")
        if (
            layer is None
            or down is None
            or up is None
            or down.ndim != 2
            or up.ndim != 2
            or down.shape[0] != up.shape[1]
            or down.shape[1] != layer.in_features
            or up.shape[0] != layer.out_features
        ):
            unmatched.extend(f"transformer.{module}.lora_{k}.weight" for k in sorted(factors))
            continue
        modules[module] = ModuleFactors(down, up, _alpha_for(module, down.shape[0], config))
    if unmatched:
        shown = ", ".join(sorted(unmatched)[:SHOWN_KEYS])
        raise errors.InvalidLora(
            f"LoRA {name!r} does not fit this model: {len(unmatched)} of {len(state_dict)} keys match no "
            f"linear layer of the Z-Image transformer (or not its shape); first: {shown}",
            hint="was it trained for another model, or another size of Z-Image?",
        )
    return modules


def _linear(transformer: nn.Module, path: str) -> Optional[nn.Linear]:
    try:
        layer = transformer.get_submodule(path)
    except AttributeError:
        return None
    return layer if isinstance(layer, nn.Linear) else None


def load(file: LoraFile, transformer: nn.Module, device: torch.device, dtype: torch.dtype) -> LoraWeights:
    """Read, check and place one file's factors on the transformer's device."""
    state_dict, metadata = read_state_dict(file)
    modules = check_and_split(file.name, state_dict, metadata, transformer)
    for factors in modules.values():
        factors.down = factors.down.to(device=device, dtype=dtype)
        factors.up = factors.up.to(device=device, dtype=dtype)
    return LoraWeights(file, modules)
