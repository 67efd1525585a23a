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


def test_the_parameters_of_a_png_made_here_are_read_back_without_decoding_its_pixels(tmp_path):
    """What the UI's "PNG info" drop restores from: our own PNGs give their parameters; anything
    else — another PNG, a JPEG, a truncated file, a 2-gigapixel header — gives None, quickly."""
    import json
    import time

    from PIL import Image

    from app.web.history import read_parameters
    from tests.helpers import bomb_png

    params = {"prompt": "山水画, a lighthouse", "seed": 42, "width": 64, "height": 64}
    ours = tmp_path / "ours.png"
    ours.write_bytes(encode_png(np.zeros((64, 64, 3), np.uint8), {"parameters": json.dumps(params)}))
    assert read_parameters(ours) == params
    plain = tmp_path / "plain.png"
    Image.new("RGB", (8, 8)).save(plain)
    jpeg = tmp_path / "photo.jpg"
    Image.new("RGB", (8, 8)).save(jpeg)
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(ours.read_bytes()[:30])
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(bomb_png(50_000, 50_000))
    not_json = tmp_path / "notjson.png"
    not_json.write_bytes(encode_png(np.zeros((4, 4, 3), np.uint8), {"parameters": "{not json"}))
    started = time.perf_counter()
    for path in (plain, jpeg, truncated, bomb, not_json):
        assert read_parameters(path) is None, path
    assert time.perf_counter() - started < 1.0


def test_the_inpaint_editors_strokes_become_the_mask():
    """Gradio's editor gives RGBA layers over the picture: painted pixels (any colour, any alpha >
    0) are repainted (white), the rest kept (black); nothing painted is no mask."""
    from PIL import Image

    from app.web.images import mask_from_layers

    stroke = Image.new("RGBA", (8, 4), (0, 0, 0, 0))
    stroke.putpixel((1, 1), (255, 255, 255, 255))
    faint = Image.new("RGBA", (16, 8), (0, 0, 0, 0))  # another size: scaled to the picture
    for xy in ((12, 6), (13, 6), (12, 7), (13, 7)):  # a 2×2 dab: one pixel of the picture
        faint.putpixel(xy, (10, 200, 10, 30))
    mask = mask_from_layers([stroke, None, faint], (8, 4))
    assert mask.mode == "L" and mask.size == (8, 4)
    assert mask.getpixel((1, 1)) == 255 and mask.getpixel((6, 3)) == 255 and mask.getpixel((0, 0)) == 0
    assert sorted(np.unique(np.asarray(mask)).tolist()) == [0, 255]
    assert mask_from_layers([Image.new("RGBA", (8, 4), (0, 0, 0, 0))], (8, 4)) is None
    assert mask_from_layers(None, (8, 4)) is None
