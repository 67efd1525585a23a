"""A fast PNG encoder for generated images: the "Up" filter in numpy and deflate in parallel chunks
(pigz-style: each chunk a raw deflate stream ending on a byte boundary, one adler32 over all).

Pillow's encoder spends 60–130 ms on a 1024×1024 image (its per-row filter search runs on one
core), which alone is over 5 % of a sub-second generation. This writes a standard PNG that any
decoder reads, in a few milliseconds, with the generation parameters in an iTXt (UTF-8) chunk.
"""

from __future__ import annotations

import struct
import zlib
from concurrent.futures import ThreadPoolExecutor

import numpy as np

_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_POOL = ThreadPoolExecutor(max_workers=8, thread_name_prefix="png")  # zlib releases the GIL
_CHUNK_BYTES = 512 * 1024


def _chunk(kind: bytes, data: bytes) -> bytes:
    return (
        struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    )


def _deflate_part(data: bytes, level: int, last: bool) -> bytes:
    comp = zlib.compressobj(level, zlib.DEFLATED, -15, 9, zlib.Z_RLE)
    return comp.compress(data) + comp.flush(zlib.Z_FINISH if last else zlib.Z_SYNC_FLUSH)


def parallel_zlib(data: bytes, level: int = 1) -> bytes:
    """A zlib stream of `data`, compressed in independent chunks on a thread pool."""
    parts = [data[i : i + _CHUNK_BYTES] for i in range(0, len(data), _CHUNK_BYTES)] or [b""]
    bodies = list(
        _POOL.map(lambda ip: _deflate_part(ip[1], level, ip[0] == len(parts) - 1), enumerate(parts))
    )
    return b"\x78\x01" + b"".join(bodies) + struct.pack(">I", zlib.adler32(data) & 0xFFFFFFFF)


def encode_png(pixels: np.ndarray, text: dict[str, str] | None = None, level: int = 1) -> bytes:
    """RGB (H, W, 3) or RGBA uint8 → PNG bytes, with optional UTF-8 text (iTXt) chunks."""
    if pixels.dtype != np.uint8 or pixels.ndim != 3 or pixels.shape[2] not in (3, 4):
        raise ValueError(f"expected (H, W, 3|4) uint8 pixels, got {pixels.shape} {pixels.dtype}")
    height, width, channels = pixels.shape
    rows = pixels.reshape(height, width * channels)
    filtered = np.empty((height, width * channels + 1), dtype=np.uint8)
    filtered[:, 0] = 2  # filter type "Up": each byte minus the byte above (mod 256)
    filtered[0, 1:] = rows[0]
    np.subtract(rows[1:], rows[:-1], out=filtered[1:, 1:])  # uint8 arithmetic wraps mod 256
    color_type = 2 if channels == 3 else 6
    out = [_SIGNATURE, _chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, color_type, 0, 0, 0))]
    for key, value in (text or {}).items():
        # iTXt: UTF-8 text (prompts are often Chinese), uncompressed
        out.append(_chunk(b"iTXt", key.encode("latin-1") + b"\x00\x00\x00\x00\x00" + value.encode("utf-8")))
    out.append(_chunk(b"IDAT", parallel_zlib(filtered.tobytes(), level)))
    out.append(_chunk(b"IEND", b""))
    return b"".join(out)
