"""The packed layout's conversions (minilm/packing.py) against plain Python on a batch with an empty sentence."""

import torch

from minilm import packing


def test_pack_split_coordinates_and_padding_round_trip():
    id_lists = [[101, 7, 8, 102], [101, 102], [], [101, 5, 102]]
    batch = packing.pack(id_lists)
    cu_seqlens = batch["cu_seqlens"]
    assert batch["input_ids"].tolist() == [token for ids in id_lists for token in ids]
    assert cu_seqlens.dtype == torch.int32 and cu_seqlens.tolist() == [0, 4, 6, 6, 9] and batch["max_seqlen"] == 4
    assert packing.lengths(cu_seqlens).tolist() == [4, 2, 0, 3]
    assert packing.length_runs(packing.pack([[1], [2], [3, 4], [5]])["cu_seqlens"]) == [(1, 2), (2, 1), (1, 1)]
    sentence, position = packing.token_coordinates(cu_seqlens)
    assert sentence.tolist() == [0, 0, 0, 0, 1, 1, 3, 3, 3] == packing.sequence_ids(cu_seqlens).tolist()
    assert position.tolist() == [0, 1, 2, 3, 0, 1, 0, 1, 2]

    x = torch.randn(9, 2, 3)  # [total_tokens, heads, dim]
    slots = packing.padding_slots(cu_seqlens, 4)
    padded = packing.pad(x, slots, 4, 4)  # [batch, heads, max_seqlen, dim]
    assert padded.shape == (4, 2, 4, 3) and torch.equal(padded[1, :, :2], x[4:6].transpose(0, 1))
    assert not padded[1, :, 2:].any() and not padded[2].any()
    assert torch.equal(packing.unpad(padded, slots), x)
    mask = packing.key_padding_mask(cu_seqlens, 4)[:, 0, 0]
    assert mask.tolist() == [[True] * 4, [True, True, False, False], [False] * 4, [True, True, True, False]]

    pieces = packing.split(batch, 3)
    assert [piece["cu_seqlens"].tolist() for piece in pieces] == [[0, 4, 6, 6], [0, 3]]
    assert [piece["max_seqlen"] for piece in pieces] == [4, 3]
    assert torch.equal(torch.cat([piece["input_ids"] for piece in pieces]), batch["input_ids"])
    assert packing.pack([])["max_seqlen"] == 0
