"""The UI's History tab: recent generations to click, and a PNG made here to drop (A1111's "PNG
Info"); either restores the settings a generation was made from, seed included."""

from __future__ import annotations

from pathlib import Path

import gradio as gr

from app.web.history import read_parameters
from app.web.retention import stage
from app.web.schemas import LORA_SCALE_MAX, LORA_SCALE_MIN, TURBO_DEFAULT_CFG, TURBO_DEFAULT_STEPS
from app.web.ui_loras import NONE, lora_choices

# prompt, negative, width, height, steps, cfg, seed, random seed (ui.settings_fields); then a LoRA
# name and its scale for each of the UI's LoRA rows (ui_loras)
SETTINGS_FIELDS = 8


class Restorer:
    def __init__(self, settings, history, default_size: int, lora_names=lambda: [], lora_rows: int = 3):
        self.settings = settings
        self.history = history
        self.default_size = default_size
        self.lora_names = lora_names  # the files there now: a restored name must be one of them
        self.lora_rows = lora_rows
        self.fields = SETTINGS_FIELDS + 2 * lora_rows  # what restored() sets, before its message

    def load_history(self):
        """The newest generations, one picture each (those retention removed are skipped)."""
        rows, items = [], []
        staged = self.settings.gradio_cache_dir / "staged"
        for row in self.history.page(24) if self.history else []:
            source = self.settings.outputs_dir / row["images"][0] if row["images"] else None
            if source is None or not source.is_file():
                continue
            items.append((str(stage(source, staged)), row["parameters"].get("prompt", "")[:80]))
            rows.append(row)
        return items, rows

    def restored(self, p: dict, seed, message: str) -> tuple:
        """The settings fields set from a generation's parameters (a History row or a PNG's)."""
        loras = [
            lora
            for lora in p.get("loras") or []
            if isinstance(lora, dict) and isinstance(lora.get("name"), str)
        ]
        names = self.lora_names() if loras else []
        there = set(names)
        kept = [lora for lora in loras if lora["name"] in there]
        missing = [lora["name"] for lora in loras if lora["name"] not in there]
        if missing:
            message += f" LoRA not here any more: {', '.join(missing)}."
        if len(kept) > self.lora_rows:
            message += f" It had {len(kept)} LoRAs; the UI has {self.lora_rows} rows: the first are set."
        choices = lora_choices(names)  # the folder's list of now: a file added since the page loaded too
        rows: list = []
        for lora in kept[: self.lora_rows]:
            rows += [gr.update(value=lora["name"], choices=choices), _scale(lora.get("scale", 1.0))]
        rows += [NONE, 1.0] * (self.lora_rows - len(rows) // 2)
        return (
            p.get("prompt", ""),
            p.get("negative_prompt", ""),
            p.get("width", self.default_size),
            p.get("height", self.default_size),
            p.get("num_inference_steps", TURBO_DEFAULT_STEPS),
            p.get("cfg_scale", TURBO_DEFAULT_CFG),
            seed,
            False,
            *rows,
            message,
        )

    def restore(self, rows, evt: gr.SelectData):
        row = rows[evt.index]
        return self.restored(
            row["parameters"],
            row["seed"],
            f"Restored `{row['request_id']}` (seed `{row['seed']}`): press Generate on the Generate tab.",
        )

    def restore_from_png(self, path):
        """A PNG made here carries what it was made with. The drop zone is emptied again (the last
        output), ready for the next file."""
        unchanged = (gr.update(),) * self.fields
        if not path:
            return (*unchanged, "", None)
        p = read_parameters(Path(path))
        if p is None or "prompt" not in p:
            told = (
                "That file carries no zimage-serve parameters (not a PNG made here, or its metadata "
                "was stripped on the way)."
            )
            return (*unchanged, told, None)
        seed = int(p.get("seed", 0))
        image_input = (
            " It was made from an input image, which the PNG does not hold."
            if p.get("mode") not in (None, "text2img")
            else ""
        )
        message = f"Restored from the PNG (seed `{seed}`): press Generate on the Generate tab.{image_input}"
        return (*self.restored(p, seed, message), None)


def _scale(value) -> float:
    """A recorded scale as the slider can show it (a hand-edited PNG may hold anything)."""
    try:
        scale = float(value)
    except (TypeError, ValueError):
        return 1.0
    return min(max(scale, LORA_SCALE_MIN), LORA_SCALE_MAX) if scale == scale else 1.0
