"""Placeholder replaced by the Gradio UI."""


def mount_ui(app, service, gpu):
    return app
