"""The Gradio UI, mounted on the app's FastAPI at `/`. It calls the same GenerationService (and so
the same request model, limits, queue and errors) as POST /api/generate: no second validation."""

from __future__ import annotations

import asyncio
import os
import time

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no calls home from a production server

import gradio as gr  # noqa: E402
from pydantic import ValidationError  # noqa: E402

from app import errors  # noqa: E402
from app.web.jobs import TERMINAL  # noqa: E402
from app.web.retention import prune_older_than, reset_dir, stage  # noqa: E402
from app.web.schemas import SIZE_STEP, TURBO_DEFAULT_CFG, TURBO_DEFAULT_STEPS  # noqa: E402
from app.web.sysinfo import live_info, model_info  # noqa: E402
from app.web.ui_history import Restorer  # noqa: E402
from app.web.ui_images import TEXT2IMG, build_image_inputs, image_fields  # noqa: E402
from app.web.ui_loras import build_lora_inputs, lora_fields, lora_names, lora_summary  # noqa: E402
from app.web.validation import validation_message  # noqa: E402

PRESETS = [
    ("512²", 512, 512),
    ("768²", 768, 768),
    ("1024²", 1024, 1024),
    ("1024×576", 1024, 576),
    ("576×1024", 576, 1024),
    ("1536²", 1536, 1536),
]
GENERATE_API_NAME = "generate"  # stable name for gradio_client: client.predict(..., api_name="/generate")
# System fonts only: the default theme pulls Google Fonts, which a closed network turns into console errors.
THEME = gr.themes.Soft(
    font=["ui-sans-serif", "system-ui", "sans-serif"],
    font_mono=["ui-monospace", "SFMono-Regular", "monospace"],
)
CSS = """
#demo-banner {background: #fff3cd; border: 1px solid #ffda6a; border-radius: 8px; padding: 4px 12px;}
#status-line {font-size: 0.95em;}
"""


def _fmt_bytes(value) -> str:
    return "–" if not value else f"{value / 2**30:.2f} GiB"


def status_text(service) -> str:
    status = service.engine.status()
    if service.ready:
        return f"● Ready · queue {status.waiting} waiting · {service.in_flight} in progress"
    if service.draining:
        return "◐ Draining for a restart: new generations are paused"
    labels = {
        "starting": "starting",
        "loading": "loading the model…",
        "warming": "warming up…",
        "failed": f"failed to start: {status.reason}",
        "unhealthy": "unhealthy: being replaced",
    }
    return f"○ Model {labels.get(status.state, status.state)} — the Generate button unlocks when ready"


def build_ui(service, gpu_reader, book) -> gr.Blocks:
    settings, limits = service.settings, service.limits
    sessions: dict[str, dict] = {}  # a browser session's generations under way, by job id
    presets = [
        p for p in PRESETS if limits.min_size <= min(p[1], p[2]) and max(p[1], p[2]) <= limits.max_size
    ]
    default_size = min(1024, limits.max_size)

    async def generate(
        prompt,
        negative_prompt,
        width,
        height,
        num_inference_steps,
        cfg_scale,
        seed,
        random_seed,
        num_images,
        mode=TEXT2IMG,
        init_image=None,
        strength=0.6,
        inpaint=None,
        inpaint_strength=1.0,
        loras=(),
        request: gr.Request = None,
        progress=gr.Progress(),
    ):
        data = {
            "prompt": prompt or "",
            "negative_prompt": negative_prompt or "",
            "width": int(width),
            "height": int(height),
            "num_inference_steps": int(num_inference_steps),
            "cfg_scale": float(cfg_scale),
            "num_images": int(num_images),
            "seed": -1 if random_seed else int(seed),
            **image_fields(mode, init_image, strength, inpaint, inpaint_strength),
            **lora_fields(loras),
        }
        try:
            req = service.validate(data)
        except ValidationError as exc:
            raise gr.Error(validation_message(exc), title="Please check the settings")
        try:
            record = await book.start(req)  # a job like POST /api/jobs: the same queue, progress to show
        except errors.ServiceError as exc:
            raise gr.Error(exc.message + (f" — {exc.hint}" if exc.hint else ""), title="Could not generate")
        session = getattr(request, "session_hash", None) or ""
        sessions.setdefault(session, {})[record.id] = record
        try:
            while record.state not in TERMINAL:
                view = book.view(record)
                if view["state"] == "queued":
                    progress(0, desc=f"Waiting: position {view['queue_position'] + 1} in the queue")
                else:
                    progress((view["step"], view["steps"]), desc="Denoising", unit="steps")
                await asyncio.sleep(0.1)
        except asyncio.CancelledError:  # the Cancel button
            book.cancel(record)
            raise
        finally:  # a session with nothing under way keeps no entry (gradio_client's never unload)
            running = sessions.get(session, {})
            running.pop(record.id, None)
            if not running:
                sessions.pop(session, None)
        if record.error is not None:
            exc = record.error
            raise gr.Error(exc.message + (f" — {exc.hint}" if exc.hint else ""), title="Could not generate")
        result = record.response
        # Gradio serves its own copies from gradio_temp_dir; outputs/ itself is not a Gradio path.
        temp_dir = settings.gradio_cache_dir
        prune_older_than(temp_dir, settings.gradio_cache_max_age_s, time.time())
        paths = [
            str(stage(settings.outputs_dir / image.filename, temp_dir / "staged")) for image in result.images
        ]
        t = result.timings
        peak = (
            f" · peak GPU memory {_fmt_bytes(result.peak_memory_bytes)}" if result.peak_memory_bytes else ""
        )
        lossy = ", ".join(service.lossy_options(result.num_inference_steps))
        lossy = f" · **Lossy speed-ups** {lossy}" if lossy else ""
        split = (
            f": encode {t.encode_s:.2f} + denoise {t.denoise_s:.2f} + decode {t.decode_s:.2f}"
            if t.denoise_s is not None
            else ""
        )
        info = (
            f"**Seed** `{result.seed}` · **Size** {result.width}×{result.height} · **Steps** "
            f"{result.num_inference_steps} · **CFG** {result.cfg_scale:g}{lora_summary(req.loras)} "
            f"· **Time** {t.total_s:.2f} s "
            f"(queue {t.queue_wait_s:.2f} s, generation {t.generation_s:.2f} s{split}){peak}{lossy}  \n"
            f"Request `{result.request_id}` · files: " + ", ".join(f"`{i.filename}`" for i in result.images)
        )
        return paths, info, result.seed

    restorer = Restorer(
        settings, service.history, default_size, lambda: lora_names(service), lora_rows=settings.max_loras
    )

    def refresh_status():
        return status_text(service), gr.update(interactive=service.ready)

    def compose(subject, action, setting, style, detail):
        parts = [p.strip() for p in (subject, action, setting, style, detail) if p and p.strip()]
        return ", ".join(parts)

    with gr.Blocks(title="Z-Image-Turbo · zimage-serve", analytics_enabled=False) as ui:
        gr.Markdown("## Z-Image-Turbo\nText to image in 8 steps. Prompts in English or Chinese (中文).")
        if settings.is_demo_model:
            gr.Markdown(
                "**Demo model:** this server runs a tiny random-weight model of the Z-Image "
                "architecture, so pictures are noise-like. Point `app.model_dir` at a local "
                "Z-Image-Turbo directory for real images.",
                elem_id="demo-banner",
            )
        status = gr.Markdown(status_text(service), elem_id="status-line")
        last_seed = gr.State(value=None)
        with gr.Tabs():
            with gr.Tab("Generate", id="generate"):
                with gr.Row():
                    with gr.Column(scale=5):
                        prompt = gr.Textbox(
                            label="Prompt",
                            lines=3,
                            max_lines=8,
                            elem_id="prompt",
                            max_length=limits.max_prompt_chars,
                            placeholder="A red fox in fresh snow at dawn, soft light, 35mm photo"
                            " / 雪地里的红狐狸，清晨柔光",
                        )
                        negative = gr.Textbox(
                            label="Negative prompt (used only when CFG > 0)",
                            lines=1,
                            max_length=limits.max_prompt_chars,
                            elem_id="negative-prompt",
                        )
                        with gr.Accordion(
                            "Prompt helper: subject / action / setting / style / detail", open=False
                        ):
                            with gr.Row():
                                h_subject = gr.Textbox(
                                    label="Subject", placeholder="a young woman in red Hanfu"
                                )
                                h_action = gr.Textbox(label="Action", placeholder="holding a paper lantern")
                            with gr.Row():
                                h_setting = gr.Textbox(label="Setting", placeholder="night market, pagoda")
                                h_style = gr.Textbox(label="Style", placeholder="photorealistic, cinematic")
                            h_detail = gr.Textbox(
                                label="Detail", placeholder="soft bokeh lights, fine embroidery"
                            )
                            compose_btn = gr.Button("Compose prompt", size="sm")
                        image_inputs = build_image_inputs()
                        lora_inputs = build_lora_inputs(service)
                        with gr.Row():
                            preset_buttons = [
                                gr.Button(label, size="sm", elem_id=f"preset-{w}x{h}")
                                for label, w, h in presets
                            ]
                        with gr.Row():
                            width = gr.Slider(
                                limits.min_size,
                                limits.max_size,
                                value=default_size,
                                step=SIZE_STEP,
                                label="Width",
                                elem_id="width",
                            )
                            height = gr.Slider(
                                limits.min_size,
                                limits.max_size,
                                value=default_size,
                                step=SIZE_STEP,
                                label="Height",
                                elem_id="height",
                            )
                        with gr.Row():
                            num_inference_steps = gr.Slider(
                                1,
                                limits.max_steps,
                                value=TURBO_DEFAULT_STEPS,
                                step=1,
                                label="Steps",
                                info="Turbo is distilled for 8 steps (8 forwards with diffusers ≥ 0.42; "
                                "the older advice of 9 now runs one extra)",
                            )
                            cfg_scale = gr.Slider(
                                0,
                                limits.max_cfg,
                                value=TURBO_DEFAULT_CFG,
                                step=0.5,
                                label="CFG scale",
                                info="Turbo needs none: keep 0",
                            )
                        with gr.Row():
                            seed = gr.Number(
                                value=42, precision=0, minimum=0, maximum=2**32 - 1, label="Seed"
                            )
                            random_seed = gr.Checkbox(value=True, label="Random seed")
                            reuse = gr.Button("Reuse last seed", size="sm")
                            num_images = gr.Slider(1, limits.max_images, value=1, step=1, label="Images")
                        with gr.Row():
                            go = gr.Button(
                                "Generate",
                                variant="primary",
                                interactive=service.ready,
                                elem_id="generate-btn",
                            )
                            cancel = gr.Button("Cancel", variant="stop", elem_id="cancel-btn")
                    with gr.Column(scale=6):
                        gallery = gr.Gallery(
                            label="Images",
                            columns=2,
                            height=560,
                            elem_id="gallery",
                            buttons=["download", "fullscreen"],
                            format="png",
                            object_fit="contain",
                            preview=True,
                        )
                        info = gr.Markdown("", elem_id="generation-info")
            with gr.Tab("History", id="history") as history_tab:
                gr.Markdown("Recent generations, newest first. Click one to restore its parameters and seed.")
                history_gallery = gr.Gallery(
                    label="History", columns=4, height=520, elem_id="history-gallery", allow_preview=False
                )
                history_rows = gr.State([])
                history_info = gr.Markdown("", elem_id="history-info")
                png_drop = gr.File(
                    label="PNG info: drop a PNG made by this service to restore its parameters and seed",
                    file_types=[".png"],
                    type="filepath",
                    elem_id="png-info",
                )
            with gr.Tab("Advanced", id="advanced"):
                gr.Markdown("### Model")
                model_json = gr.JSON(value=lambda: model_info(service), label="Model and options")
                gr.Markdown("### Live system")
                live_json = gr.JSON(value=lambda: live_info(service, gpu_reader), label="GPU / CPU / queue")
        timer = gr.Timer(2.0)
        timer.tick(refresh_status, outputs=[status, go], queue=False, show_progress="hidden")
        timer.tick(
            lambda: live_info(service, gpu_reader), outputs=live_json, queue=False, show_progress="hidden"
        )
        timer.tick(lambda: model_info(service), outputs=model_json, queue=False, show_progress="hidden")
        for button, (_, w, h) in zip(preset_buttons, presets):
            button.click(lambda w=w, h=h: (w, h), outputs=[width, height], queue=False)
        reuse.click(
            lambda s: (gr.update(value=s) if s is not None else gr.update(), False),
            inputs=last_seed,
            outputs=[seed, random_seed],
            queue=False,
        )
        compose_btn.click(
            compose, inputs=[h_subject, h_action, h_setting, h_style, h_detail], outputs=prompt, queue=False
        )
        history_tab.select(restorer.load_history, outputs=[history_gallery, history_rows], queue=False)
        # The settings a generation is made from: what generate reads and what History restores.
        settings_fields = [prompt, negative, width, height, num_inference_steps, cfg_scale, seed, random_seed]
        history_gallery.select(
            restorer.restore,
            inputs=history_rows,
            outputs=settings_fields + [*lora_inputs, history_info],
            queue=False,
        )
        png_drop.upload(
            restorer.restore_from_png,
            inputs=png_drop,
            outputs=settings_fields + [*lora_inputs, history_info, png_drop],
            queue=False,
        )
        form = settings_fields + [num_images, *image_inputs]

        async def generate_from_form(values: dict, request: gr.Request, progress=gr.Progress()):
            # Inputs given as a set come as one dict: generate's arguments, then however many LoRA
            # rows app.max_loras makes (Gradio passes a gr.Progress only to named parameters).
            rows = [values[c] for c in lora_inputs]
            return await generate(*(values[c] for c in form), loras=rows, request=request, progress=progress)

        async def leave(request: gr.Request):
            # The tab was closed or reloaded: Gradio's unload, run as its heartbeat connection drops.
            # Gradio only stops sending that tab's events (it cancels no task), so its generation
            # would run on for nobody; it is cancelled as if its Cancel button had been pressed.
            for record in sessions.pop(request.session_hash or "", {}).values():
                book.cancel(record)

        ui.unload(leave)

        generation = go.click(
            generate_from_form,
            inputs={*form, *lora_inputs},
            outputs=[gallery, info, last_seed],
            api_name="generate_from_ui",
            concurrency_limit=settings.max_batch,
        )
        cancel.click(None, cancels=[generation], queue=False)
        # The named API that gradio_client users call keeps its arguments (text to image; the
        # image modes are the JSON API's): an invisible trigger over the same function.
        api_only = gr.Button(visible=False)
        api_only.click(
            generate,
            inputs=settings_fields + [num_images],
            outputs=[gallery, info, last_seed],
            api_name=GENERATE_API_NAME,
            concurrency_limit=settings.max_batch,
        )
    ui.queue(max_size=max(1, settings.queue_size), default_concurrency_limit=settings.max_batch)
    return ui


def mount_ui(app, service, gpu_reader, book):
    """Mount the UI at /. GRADIO_TEMP_DIR must already name settings.gradio_cache_dir (app.web.api sets
    it before gradio is imported: some of gradio reads it at import)."""
    settings = service.settings
    reset_dir(settings.gradio_cache_dir)
    ui = build_ui(service, gpu_reader, book)
    # No allowed_paths: Gradio's file route serves only the copies it made, behind app.web.auth's gate.
    return gr.mount_gradio_app(
        app,
        ui,
        path="/",
        theme=THEME,
        css=CSS,
        show_error=True,
        ssr_mode=False,
        max_file_size=settings.max_upload_mb * 2**20,
        footer_links=["api"],
    )
