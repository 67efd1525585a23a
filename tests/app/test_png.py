import io
import json

import numpy as np
import pytest
from PIL import Image

from app.web.png import encode_png, parallel_zlib


@pytest.mark.parametrize("shape", [(1, 1, 3), (7, 5, 3), (576, 1024, 3), (300, 200, 4)])
def test_decodes_to_the_same_pixels(shape):
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, size=shape, dtype=np.uint8)
    image = Image.open(io.BytesIO(encode_png(pixels)))
    image.load()
    assert image.size == (shape[1], shape[0])
    assert np.array_equal(np.asarray(image), pixels)


def test_text_chunks_carry_utf8_parameters():
    params = json.dumps({"prompt": "雪地里的红狐狸 — a fox", "seed": 7}, ensure_ascii=False)
    image = Image.open(io.BytesIO(encode_png(np.zeros((8, 8, 3), np.uint8), {"parameters": params})))
    assert json.loads(image.text["parameters"])["prompt"].startswith("雪地")


def test_parallel_zlib_is_a_valid_stream():
    import zlib

    data = bytes(range(256)) * 9000  # several chunks
    assert zlib.decompress(parallel_zlib(data)) == data
    assert zlib.decompress(parallel_zlib(b"")) == b""


def test_rejects_wrong_input():
    with pytest.raises(ValueError):
        encode_png(np.zeros((4, 4), np.uint8))
