"""The UI's LoRA inputs: one row per LoRA a request may name (app.max_loras), each a file of
app.lora_dir to pick (listed again on demand) and its own scale, turned into the request's `loras`
field, so the UI and the API share one validation (two rows naming one file get the API's reason)."""

from __future__ import annotations

import gradio as gr

from app.web.schemas import LORA_SCALE_MAX, LORA_SCALE_MIN

NONE = ""  # a row with no LoRA picked


def lora_names(service) -> list[str]:
    library = service.lora_library
    return [f.name for f in library.files()] if library is not None else []


def lora_choices(names: list[str]) -> list[tuple[str, str]]:
    return [("(none)", NONE)] + [(name, name) for name in names]


def build_lora_inputs(service) -> list:
    """[name, scale] for each row, flat, inside the Generate tab's Blocks context; hidden when the
    server serves no LoRAs (lora_dir not set)."""
    rows = service.settings.max_loras
    choices = lora_choices(lora_names(service))
    inputs, pickers = [], []
    with gr.Accordion("LoRA", open=False, visible=service.lora_library is not None, elem_id="lora-section"):
        for row in range(rows):
            with gr.Row():
                picker = gr.Dropdown(
                    choices=choices,
                    value=NONE,
                    label=f"LoRA {row + 1} of {rows}, from the server's LoRA folder",
                    elem_id=f"lora-picker-{row}",
                    scale=3,
                )
                scale = gr.Slider(
                    LORA_SCALE_MIN,
                    LORA_SCALE_MAX,
                    value=1.0,
                    step=0.05,
                    label="scale",
                    elem_id=f"lora-scale-{row}",
                    scale=2,
                )
            inputs += [picker, scale]
            pickers.append(picker)
        refresh = gr.Button("↻ List again", size="sm", elem_id="lora-refresh")
    refresh.click(
        lambda: [gr.update(choices=lora_choices(lora_names(service)))] * rows, outputs=pickers, queue=False
    )
    return inputs


def lora_fields(rows) -> dict:
    """The request's `loras` from the flat [name, scale, name, scale, ...] of the rows."""
    loras = [{"name": name, "scale": float(scale)} for name, scale in zip(rows[::2], rows[1::2]) if name]
    return {"loras": loras} if loras else {}


def lora_summary(loras) -> str:
    """For the generation info: ' · **LoRA** ink ×1, film ×0.5' (nothing without LoRAs)."""
    if not loras:
        return ""
    return " · **LoRA** " + ", ".join(f"{lora.name} ×{lora.scale:g}" for lora in loras)
