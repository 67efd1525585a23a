"""Input images (image-to-image, inpainting), from base64 in a JSON body to a checked PIL image.

Every way an upload can be bad ends in errors.InvalidImage (422) with the field's name and what
is wrong with it, never a 500: not base64, not an image, truncated, or a decompression bomb (the
pixel count is read from the header and refused before a single pixel is decoded)."""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import warnings

from PIL import Image, UnidentifiedImageError

from app import errors

MAX_INPUT_PIXELS = 4096 * 4096  # 16.8 MP: a 4096² photo; the output is at most max_size² anyway


def decode_image(
    text: str, field: str, mode: str = "RGB", max_pixels: int = MAX_INPUT_PIXELS
) -> tuple[Image.Image, str]:
    """The image in `text` (base64, a data: URL prefix allowed) and the sha256 of its bytes."""
    if text.startswith("data:"):
        text = text.partition(",")[2]
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise errors.InvalidImage(f"{field} is not valid base64") from None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            width, height = image.size
            if width * height > max_pixels:
                raise errors.InvalidImage(
                    f"{field} is {width}×{height} ({width * height / 1e6:.0f} MP); "
                    f"at most {max_pixels / 1e6:.0f} MP",
                    hint="send a smaller image; it is resized to width×height anyway",
                )
            image.load()
    except errors.InvalidImage:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise errors.InvalidImage(
            f"{field} declares far more pixels than it could hold (a decompression bomb); "
            f"at most {max_pixels / 1e6:.0f} MP"
        ) from None
    except UnidentifiedImageError:
        raise errors.InvalidImage(f"{field} is not an image this service reads (PNG, JPEG, WebP)") from None
    except (OSError, SyntaxError, ValueError):
        raise errors.InvalidImage(f"{field} is truncated or corrupt") from None
    return image.convert(mode), hashlib.sha256(data).hexdigest()


def fit(image: Image.Image, width: int, height: int) -> Image.Image:
    """The image at the output's size (the pipeline works at width×height)."""
    return image if image.size == (width, height) else image.resize((width, height), Image.LANCZOS)


def to_base64_png(image: Image.Image) -> str:
    """The UI's images travel to the service as the API's do: base64 PNG (one path, one validation)."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=1)
    return base64.b64encode(buffer.getvalue()).decode()


def mask_from_layers(layers: list, size: tuple[int, int]) -> Image.Image | None:
    """Gradio's image editor gives the strokes as RGBA layers over the picture: whatever was
    painted (alpha > 0, any colour) is repainted (white), the rest kept (black). None: nothing painted."""
    mask = Image.new("L", size, 0)
    for layer in layers or []:
        if layer is None:
            continue
        alpha = layer.convert("RGBA").getchannel("A")
        if alpha.size != size:
            alpha = alpha.resize(size, Image.Resampling.NEAREST)
        mask.paste(255, mask=alpha.point(lambda a: 255 if a > 0 else 0))
    return mask if mask.getbbox() else None
