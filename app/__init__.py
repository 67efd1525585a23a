"""zimage-serve app: the Z-Image-Turbo engine, JSON API and Gradio UI in one uvicorn process."""

__version__ = "0.1.0"
