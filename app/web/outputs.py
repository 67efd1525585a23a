"""Save generated images as PNGs with their parameters embedded; serve them back by safe name only."""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import time
from pathlib import Path

import numpy as np
from PIL import Image

from app import errors
from app.web.png import encode_png

# Names we create: <utc timestamp>-<request id>-<index>.png. Anything else is refused when served.
SAFE_NAME = re.compile(r"^[0-9]{8}T[0-9]{6}-[A-Za-z0-9_-]{1,64}-[0-9]{1,2}\.png$")


class OutputStore:
    def __init__(self, directory: Path, min_free_bytes: int, compress_level: int = 1):
        self.directory = directory
        self.min_free_bytes = min_free_bytes
        self.compress_level = compress_level

    def check_writable(self) -> None:
        """Fail early (at start and before each save) with a reason an operator can fix."""
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise errors.StorageError(
                f"outputs dir {self.directory} cannot be created: {exc.strerror}"
            ) from None
        if not os.access(self.directory, os.W_OK | os.X_OK):
            raise errors.StorageError(
                f"outputs dir {self.directory} is not writable",
                hint="fix its permissions or set app.outputs_dir",
            )
        free = shutil.disk_usage(self.directory).free
        if free < self.min_free_bytes:
            raise errors.StorageError(
                f"disk almost full: {free // 2**20} MiB free under {self.directory}, "
                f"{self.min_free_bytes // 2**20} MiB required",
                hint="free disk space or prune old outputs",
            )

    def encode(self, image: Image.Image, metadata: dict) -> bytes:
        pixels = np.asarray(image if image.mode in ("RGB", "RGBA") else image.convert("RGB"))
        return encode_png(
            pixels,
            {"parameters": json.dumps(metadata, ensure_ascii=False), "Software": "zimage-serve"},
            level=self.compress_level,
        )

    def save(self, images: list, request_id: str, metadata: dict) -> list[tuple[str, bytes]]:
        """Write each image atomically; return (file name, PNG bytes) pairs."""
        self.check_writable()
        stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
        safe_id = re.sub(r"[^A-Za-z0-9_-]", "", request_id)[:64] or "req"
        saved = []
        for index, image in enumerate(images):
            data = self.encode(image, {**metadata, "index": index})
            name = f"{stamp}-{safe_id}-{index}.png"
            final = self.directory / name
            tmp = self.directory / f".{name}.tmp"
            try:
                with open(tmp, "wb") as fh:
                    fh.write(data)
                os.replace(tmp, final)
            except OSError as exc:
                tmp.unlink(missing_ok=True)
                raise errors.StorageError(
                    f"could not write {name}: {exc.strerror}",
                    hint="check disk space and permissions of the outputs dir",
                ) from None
            saved.append((name, data))
        return saved

    def path_for(self, name: str) -> Path | None:
        """The file for a served name, or None: only our own names, only directly inside the dir."""
        if not SAFE_NAME.match(name):
            return None
        path = self.directory / name
        return path if path.is_file() else None

    @staticmethod
    def to_base64(data: bytes) -> str:
        return base64.b64encode(data).decode("ascii")
