"""What History and PNG info restore into the UI's fields, LoRAs included (the browser test clicks
it through; these are the cases a browser test would not reach)."""

from app.web.ui_history import Restorer

ROWS = 3  # the UI's LoRA rows (app.max_loras)


def restored(parameters: dict, names=("ink", "film", "oil", "wax")) -> tuple:
    restorer = Restorer(None, None, 1024, lambda: list(names), lora_rows=ROWS)
    out = restorer.restored(parameters, 7, "Restored.")
    assert len(out) == restorer.fields + 1 == 8 + 2 * ROWS + 1  # the settings, the rows, the message
    return out


def rows(out: tuple) -> list:
    """The rows' values (a restored name comes as an update that also lists the folder's files now)."""
    return [r["value"] if isinstance(r, dict) else r for r in out[8:-1]]


def test_each_lora_comes_back_in_its_row_with_its_own_scale():
    out = restored(
        {"prompt": "a boat", "loras": [{"name": "ink", "scale": 0.3}, {"name": "film", "scale": 0.8}]}
    )
    assert out[0] == "a boat" and out[6] == 7
    assert rows(out) == ["ink", 0.3, "film", 0.8, "", 1.0] and out[-1] == "Restored."
    assert [c[1] for c in out[8]["choices"]] == ["", "ink", "film", "oil", "wax"]


def test_a_lora_no_longer_there_is_left_out_and_said():
    out = restored(
        {"prompt": "a boat", "loras": [{"name": "gone", "scale": 1}, {"name": "film", "scale": 0.5}]}
    )
    assert rows(out) == ["film", 0.5, "", 1.0, "", 1.0] and "not here any more: gone" in out[-1]


def test_more_loras_than_rows_sets_the_first_and_says_so():
    loras = [{"name": n, "scale": 1} for n in ("ink", "film", "oil", "wax")]
    out = restored({"prompt": "a", "loras": loras})
    assert rows(out) == ["ink", 1.0, "film", 1.0, "oil", 1.0] and "had 4 LoRAs" in out[-1]


def test_a_scale_the_slider_cannot_show_is_brought_into_range():
    loras = [
        {"name": "ink", "scale": 99},
        {"name": "film", "scale": "x"},
        {"name": "oil", "scale": float("nan")},
    ]
    assert rows(restored({"prompt": "a", "loras": loras})) == ["ink", 4.0, "film", 1.0, "oil", 1.0]


def test_no_loras_or_a_malformed_field_restores_none():
    malformed = [3, {}, {"name": 3}, {"name": None, "scale": 1}]
    for parameters in ({"prompt": "a"}, {"prompt": "a", "loras": "ink"}, {"prompt": "a", "loras": malformed}):
        out = restored(parameters)
        assert rows(out) == ["", 1.0] * ROWS and out[-1] == "Restored."
