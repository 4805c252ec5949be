import json

import pytest

from lit_prune.components.mask_io import MaskArtifact, MaskError, load_mask, mask_from_segments, same_model, save_mask


def test_round_trip_and_keys(tmp_path):
    artifact = MaskArtifact("org/model", 8, [2, 3, 4, 6], method="clp", scores=[1, 2, 3, 4, 5, 6, 7, 8])
    path = save_mask(tmp_path / "run" / "mask.json", artifact)
    data = json.loads(path.read_text())
    assert data["segments"] == [[2, 5], [6, 7]]
    assert {"model", "num_layers", "drop", "segments", "method", "scores"} <= set(data)
    loaded = load_mask(path)
    assert loaded == artifact
    assert loaded.keep == [0, 1, 5, 7]
    assert loaded.describe() == (
        "clp: drop 4/8 layers, segments [2, 5), [6, 7) (end-exclusive, 0-based) of org/model"
    )
    assert not list(tmp_path.glob("run/.mask.json*")), "no temporary file left behind"


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        ({"model": "m", "num_layers": 4, "drop": [4]}, "outside"),
        ({"model": "m", "num_layers": 4, "drop": [1, 1]}, "more than once"),
        ({"model": "m", "num_layers": 4, "drop": [2, 1]}, "sorted"),
        ({"model": "m", "num_layers": 4, "drop": [0, 1, 2, 3]}, "drops all"),
        ({"model": "m", "drop": [1]}, "missing keys"),
        ({"model": "m", "num_layers": 4, "drop": "1"}, "list of layer indices"),
        ({"model": "m", "num_layers": 0, "drop": []}, "positive integer"),
        ({"model": "m", "num_layers": 4, "drop": [1, 2], "segments": [[1, 2]]}, "do not match"),
        ({"model": "m", "num_layers": 4, "drop": [1], "scores": [1.0]}, "one value per layer"),
    ],
)
def test_bad_masks_are_rejected_with_the_reason(tmp_path, payload, message):
    path = tmp_path / "mask.json"
    path.write_text(json.dumps(payload))
    with pytest.raises(MaskError, match=message):
        load_mask(path)


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(MaskError, match="does not exist"):
        load_mask(tmp_path / "nope.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(MaskError, match="not valid JSON"):
        load_mask(tmp_path / "bad.json")


def test_check_fits_layer_count_and_model_id():
    artifact = MaskArtifact("HuggingFaceTB/SmolLM2-135M-Instruct", 30, [13, 14])
    artifact.check_fits(30, "offline:smollm2-135m")
    artifact.check_fits(30, "/some/cache/SmolLM2-135M-Instruct")
    with pytest.raises(MaskError, match="30 decoder layers.*has 32"):
        artifact.check_fits(32)
    with pytest.raises(MaskError, match="not 'meta-llama/Llama-2-7b-hf'"):
        artifact.check_fits(30, "meta-llama/Llama-2-7b-hf")
    artifact.check_fits(30, "meta-llama/Llama-2-7b-hf", allow_model_mismatch=True)


def test_helpers():
    assert mask_from_segments("m", 10, [[2, 4], [7, 8]]).drop == [2, 3, 7]
    assert same_model("a/B", "/x/b") and not same_model("a/b", "a/c")
