from __future__ import annotations

import pytest
import torch

from core.batch import Batch, model_inputs
from tests.helpers import random_batch


def test_undeclared_field_is_rejected():
    with pytest.raises(KeyError, match="not declared"):
        Batch(my_field=torch.ones(2))
    with pytest.raises(ValueError, match="samples"):
        Batch(rewards=torch.ones(2), group_ids=torch.ones(3))


def test_select_concat_split_trim_roundtrip():
    b = random_batch(0, B=8).with_fields(ground_truth=list("abcdefgh"))
    parts = b.split(3)
    assert [len(p) for p in parts] == [3, 3, 2]
    back = Batch.concat(parts)
    for name in ("prompt_mask", "response_mask"):
        assert back[name].sum() == b[name].sum()
    assert back.ground_truth == list("abcdefgh")
    # trimming only removes all-padding columns: real tokens and positions are unchanged
    ids, mask, pos = model_inputs(parts[0])
    ids_full, mask_full, pos_full = model_inputs(b.select(range(3)))
    assert torch.equal(ids_full[mask_full.bool()], ids[mask.bool()])
    assert torch.equal(pos_full[mask_full.bool()], pos[mask.bool()])


def test_repeat_interleave_keeps_groups_adjacent():
    b = Batch(group_ids=torch.tensor([4, 9]), ground_truth=["x", "y"])
    r = b.repeat_interleave(3)
    assert r.group_ids.tolist() == [4, 4, 4, 9, 9, 9] and r.ground_truth == ["x"] * 3 + ["y"] * 3
