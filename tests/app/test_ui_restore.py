"""What History and PNG info restore into the UI's fields, LoRAs included (the browser test clicks
it through; these are the cases a browser test would not reach)."""

from app.web.ui_history import SETTINGS_FIELDS, Restorer


def restored(parameters: dict, names=("ink", "film")) -> tuple:
    out = Restorer(None, None, 1024, lambda: list(names)).restored(parameters, 7, "Restored.")
    assert len(out) == SETTINGS_FIELDS + 1  # the settings, then the message
    return out


def test_loras_come_back_with_their_scale():
    out = restored({"prompt": "a boat", "loras": [{"name": "ink", "scale": 0.5}]})
    assert out[0] == "a boat" and out[6] == 7 and out[8] == ["ink"] and out[9] == 0.5
    assert out[10] == "Restored."


def test_a_lora_no_longer_there_is_left_out_and_said():
    out = restored(
        {"prompt": "a boat", "loras": [{"name": "gone", "scale": 1}, {"name": "film", "scale": 1}]}
    )
    assert out[8] == ["film"] and "not here any more: gone" in out[10]


def test_different_scales_are_said_and_the_largest_is_set():
    out = restored(
        {"prompt": "a boat", "loras": [{"name": "ink", "scale": 0.3}, {"name": "film", "scale": 0.8}]}
    )
    assert out[8] == ["ink", "film"] and out[9] == 0.8 and "different scales (0.3, 0.8)" in out[10]


def test_no_loras_or_a_malformed_field_restores_none():
    for parameters in ({"prompt": "a"}, {"prompt": "a", "loras": "ink"}, {"prompt": "a", "loras": [3, {}]}):
        out = restored(parameters)
        assert out[8] == [] and out[9] == 1.0 and out[10] == "Restored."
