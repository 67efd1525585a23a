"""GET /api/loras: the LoRA files a request may name, and which of them are loaded now."""

from __future__ import annotations

from datetime import datetime, timezone

from fastapi import FastAPI
from starlette.concurrency import run_in_threadpool


def add_lora_routes(app: FastAPI, service) -> None:
    @app.get("/api/loras", tags=["api"])
    async def list_loras():
        """The files under app.lora_dir (name them in a request's `loras`); empty when the server
        serves none."""
        library = service.lora_library
        if library is None:
            return {"enabled": False, "max_per_request": 0, "loras": []}
        files = await run_in_threadpool(library.files)  # (a directory on a slow disk: off the loop)
        state = service.engine.status().loras or {}
        loaded = set(state.get("loaded", []))
        return {
            "enabled": True,
            "max_per_request": service.settings.max_loras,
            "merged_now": state.get("merged", []),
            "memory_bytes": state.get("bytes", 0),  # factors + kept originals, beside the model
            "loras": [
                {
                    "name": f.name,
                    "size_bytes": f.size_bytes,
                    "modified": datetime.fromtimestamp(f.mtime_ns / 1e9, timezone.utc).isoformat(),
                    "loaded": f.name in loaded,
                }
                for f in files
            ],
        }
