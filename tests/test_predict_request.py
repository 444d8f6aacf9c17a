"""PredictRequest: predict's settings, checked once at the entry and recorded as before."""
from __future__ import annotations

import pytest

from unet_pipe.errors import ConfigError
from unet_pipe.intensity import IntensityRange
from unet_pipe.predict import PredictRequest, predict


def test_record_is_the_fingerprinted_request() -> None:
    request = PredictRequest(tile=[100, 92], block=(1, 64.0, 64), batch=3, tta="flips", dtype="uint8",
                             precision="float32", ngff="0.5")
    assert request.record(IntensityRange(1.5, 2.0)) == {
        "tile": [100, 92], "block": [1, 64, 64], "batch": 3, "tta": "flips", "dtype": "uint8",
        "precision": "float32", "intensity": [1.5, 2.0], "ngff": "0.5",
    }
    assert PredictRequest(tile=100).record(None) == {
        "tile": [100], "block": None, "batch": None, "tta": False, "dtype": "float32", "precision": "auto",
        "intensity": None, "ngff": "0.4",
    }


@pytest.mark.parametrize(("option", "error", "message"), [
    ({"tta": "rotations"}, ValueError, "tta must be one of"),
    ({"tta": 1}, ValueError, "tta must be one of"),  # 1 == True, but not a mode
    ({"dtype": "int8"}, ConfigError, "output dtype must be one of"),
    ({"precision": "half"}, ConfigError, "precision must be one of auto, float32, bfloat16, got 'half'"),
    ({"ngff": "0.3"}, ValueError, "NGFF version must be one of"),
])
def test_a_bad_setting_is_refused_when_the_request_is_made(option, error, message) -> None:
    with pytest.raises(error, match=message):
        PredictRequest(**option)


def test_predict_checks_its_settings_before_reading_anything(tmp_path) -> None:
    # Neither the checkpoint nor the input exists: the setting is what is refused.
    with pytest.raises(ConfigError, match="output dtype"):
        predict(tmp_path / "none.pt", tmp_path / "none.ome.zarr", tmp_path / "out.ome.zarr", dtype="int8")
