"""benchmarks/paired_kl.py: per-block KL agrees with output_kl, and the paired statistics."""

from __future__ import annotations

import json

import pytest
import torch

from benchmarks.paired_kl import block_kls, masks_from_search, paired
from lit_prune.components.gating import LayerGating
from lit_prune.components.scorers import output_kl
from tests.tiny import VOCAB, tiny_model


def test_block_kls_average_to_output_kl():
    model = tiny_model("llama").eval()
    gating = LayerGating(model)
    blocks = torch.randint(3, VOCAB, (5, 12), generator=torch.Generator().manual_seed(0))
    drops = [[1], [2, 3], []]
    per_block = block_kls(model, gating, blocks, drops, "cpu")
    assert [len(v) for v in per_block] == [5, 5, 5]
    assert per_block[2] == [0.0] * 5  # nothing removed: the dense model itself
    for drop, values in zip(drops[:2], per_block[:2]):
        keep = [i not in drop for i in range(gating.num_layers)]
        whole = output_kl(model, gating, [blocks], keep)  # equal-length blocks: mean of block means = token mean
        assert sum(values) / len(values) == pytest.approx(whole, rel=1e-5)
        assert len(set(values)) > 1  # the blocks differ, so the standard error below is not zero


def test_paired_difference_and_standard_error():
    result = paired([2.0, 3.0, 4.0], [1.0, 1.0, 1.0])
    assert result["n"] == 3 and result["diff"] == pytest.approx(2.0)
    assert result["stderr"] == pytest.approx(((1 + 0 + 1) / 2 / 3) ** 0.5)
    assert result["relative"] == pytest.approx(2.0)
    assert paired([1.5, 2.5], [1.5, 2.5])["stderr"] == 0.0


def test_masks_from_search_reads_every_budget(tmp_path):
    path = tmp_path / "search.json"
    path.write_text(json.dumps({"ratios": {"4/18": {"methods": {"e3": {"drop": [9, 7, 8, 14]},
                                                                "sleb": {"drop": [6, 7, 8, 9]}}}}}))
    assert masks_from_search([str(path)]) == {"4/18": {"e3": [7, 8, 9, 14], "sleb": [6, 7, 8, 9]}}
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"rows": []}))
    with pytest.raises(SystemExit, match="not a benchmarks.search_quality result"):
        masks_from_search([str(other)])
