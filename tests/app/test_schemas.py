import pytest
from pydantic import ValidationError

from app.web.schemas import Limits, build_request_model

Model = build_request_model(
    Limits(min_size=256, max_size=2048, max_steps=50, max_images=4, max_prompt_chars=100)
)


def errors_of(**fields):
    with pytest.raises(ValidationError) as info:
        Model(**fields)
    return [e["msg"] for e in info.value.errors()]


def test_defaults_are_turbos_distilled_schedule():
    req = Model(prompt="a red fox")
    assert (req.width, req.height, req.num_inference_steps, req.cfg_scale, req.num_images, req.seed) == (
        1024,
        1024,
        8,
        0.0,
        1,
        -1,
    )


@pytest.mark.parametrize("size,expected", [(1000, "try 1024"), (1025, "try 1024"), (300, "try 320")])
def test_size_not_multiple_of_64_suggests_nearest(size, expected):
    (msg,) = errors_of(prompt="x", width=size)
    assert "not a multiple of 64" in msg and expected in msg


@pytest.mark.parametrize(
    "size,expected", [(4096, "try 2048"), (128, "try 256"), (0, "try 256"), (-64, "try 256")]
)
def test_size_out_of_range(size, expected):
    (msg,) = errors_of(prompt="x", height=size)
    assert "outside 256..2048" in msg and expected in msg


@pytest.mark.parametrize(
    "field,value",
    [
        ("num_inference_steps", 0),
        ("num_inference_steps", 51),
        ("num_images", 0),
        ("num_images", 5),
        ("seed", -2),
        ("seed", 2**32),
        ("cfg_scale", -1),
        ("cfg_scale", 21),
        ("cfg_scale", float("nan")),
        ("cfg_scale", float("inf")),
    ],
)
def test_numeric_bounds(field, value):
    assert errors_of(prompt="x", **{field: value})


def test_prompt_rules():
    assert "prompt is empty" in errors_of(prompt="   ")[0]
    assert errors_of(prompt="x" * 101)  # over max_prompt_chars
    assert "NUL" in errors_of(prompt="a\x00b")[0]
    assert errors_of(width=512)  # prompt missing
    assert Model(prompt="一只在雪地里的红狐狸, cinematic").prompt.startswith("一只")


def test_unknown_fields_are_rejected():
    assert "Extra inputs" in errors_of(prompt="x", steps=4)[0]


def test_limits_are_taken_from_the_config():
    small = build_request_model(Limits(min_size=64, max_size=512))
    assert small(prompt="x", width=64, height=512).width == 64
    with pytest.raises(ValidationError):
        small(prompt="x", width=1024)
    assert Limits(min_size=64, max_size=512).nearest_size(1000) == 512
