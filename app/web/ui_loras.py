"""The UI's LoRA inputs: the files of app.lora_dir to pick from (listed again on demand) and one
scale for them, turned into the request's `loras` field, so the UI and the API share one validation."""

from __future__ import annotations

import gradio as gr


def lora_names(service) -> list[str]:
    library = service.lora_library
    return [f.name for f in library.files()] if library is not None else []


def build_lora_inputs(service) -> tuple:
    """(picked names, scale), inside the Generate tab's Blocks context; hidden when the server
    serves no LoRAs (lora_dir not set)."""
    with gr.Accordion("LoRA", open=False, visible=service.lora_library is not None, elem_id="lora-section"):
        with gr.Row():
            picked = gr.Dropdown(
                choices=lora_names(service),
                value=[],
                multiselect=True,
                max_choices=service.settings.max_loras,
                label=f"LoRAs (up to {service.settings.max_loras}), from the server's LoRA folder",
                elem_id="lora-picker",
                scale=4,
            )
            refresh = gr.Button("↻ List again", size="sm", scale=1, elem_id="lora-refresh")
        scale = gr.Slider(-2.0, 2.0, value=1.0, step=0.05, label="LoRA scale (each)", elem_id="lora-scale")
    refresh.click(lambda: gr.update(choices=lora_names(service)), outputs=picked, queue=False)
    return picked, scale


def lora_fields(picked, scale) -> dict:
    return {"loras": [{"name": name, "scale": float(scale)} for name in picked]} if picked else {}


def lora_summary(loras) -> str:
    """For the generation info: ' · **LoRA** ink ×1, film ×0.5' (nothing without LoRAs)."""
    if not loras:
        return ""
    return " · **LoRA** " + ", ".join(f"{lora.name} ×{lora.scale:g}" for lora in loras)
