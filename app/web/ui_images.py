"""The UI's "Start from an image" inputs: an Image-to-image tab (an upload and a strength) and an
Inpaint tab (Gradio's image editor: the strokes are the mask), turned into the same request fields
as POST /api/generate's (base64 PNGs), so the UI and the API share one validation."""

from __future__ import annotations

import gradio as gr

from app.web.images import mask_from_layers, to_base64_png

TEXT2IMG, IMG2IMG, INPAINT = "Text to image", "Image to image", "Inpaint"


def build_image_inputs() -> tuple:
    """The components, inside the Generate tab's Blocks context: (mode, init image, strength,
    inpaint editor, inpaint strength), in image_fields' order."""
    with gr.Accordion("Start from an image (image-to-image, inpainting)", open=False):
        mode = gr.Radio([TEXT2IMG, IMG2IMG, INPAINT], value=TEXT2IMG, label="Mode", elem_id="mode")
        with gr.Tabs():
            with gr.Tab("Image to image", id="img2img"):
                init_image = gr.Image(
                    type="pil",
                    label="Start from",
                    sources=["upload", "clipboard"],
                    elem_id="init-image",
                    height=320,
                )
                strength = gr.Slider(
                    0.05,
                    1.0,
                    value=0.6,
                    step=0.05,
                    label="Strength",
                    info="How much changes: 0.6 keeps the composition, 1.0 ignores the image",
                )
            with gr.Tab("Inpaint", id="inpaint"):
                inpaint = gr.ImageEditor(
                    type="pil",
                    label="Paint over what to repaint",
                    elem_id="inpaint-editor",
                    sources=["upload", "clipboard"],
                    height=360,
                    brush=gr.Brush(colors=["#ffffff"], color_mode="fixed"),
                )
                inpaint_strength = gr.Slider(
                    0.05,
                    1.0,
                    value=1.0,
                    step=0.05,
                    label="Strength",
                    info="1.0 repaints the masked part from scratch",
                )
        gr.Markdown("The image is fitted to the width and height below (multiples of 64).")
    return mode, init_image, strength, inpaint, inpaint_strength


def image_fields(mode, init_image, strength, inpaint, inpaint_strength) -> dict:
    """The request's image fields for the chosen mode; a gr.Error that says what is missing."""
    if mode == IMG2IMG:
        if init_image is None:
            raise gr.Error("Upload the image to start from, or choose Text to image.", title="No image")
        return {"init_image": to_base64_png(init_image), "strength": float(strength)}
    if mode == INPAINT:
        background = (inpaint or {}).get("background")
        if background is None:
            raise gr.Error("Upload the image to paint on, or choose Text to image.", title="No image")
        mask = mask_from_layers((inpaint or {}).get("layers"), background.size)
        if mask is None:
            raise gr.Error("Paint over the part to repaint (the brush), then Generate.", title="No mask")
        return {
            "init_image": to_base64_png(background.convert("RGB")),
            "mask_image": to_base64_png(mask),
            "strength": float(inpaint_strength),
        }
    return {}
