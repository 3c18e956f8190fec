"""The packed layout's conversions (minilm/packing.py) against plain Python on a batch with an empty sentence.

One case per conversion, so that a failing one names itself."""

import pytest
import torch

from minilm import packing

ID_LISTS = [[101, 7, 8, 102], [101, 102], [], [101, 5, 102]]


@pytest.fixture
def batch():
    return packing.pack(ID_LISTS)


def test_pack_lays_sentences_end_to_end(batch):
    assert batch["input_ids"].tolist() == [token for ids in ID_LISTS for token in ids]
    assert batch["cu_seqlens"].dtype == torch.int32 and batch["cu_seqlens"].tolist() == [0, 4, 6, 6, 9]
    assert batch["longest"] == 4


def test_pack_of_nothing_is_empty():
    empty = packing.pack([])
    assert empty["longest"] == 0 and empty["cu_seqlens"].tolist() == [0] and empty["input_ids"].numel() == 0


def test_lengths(batch):
    assert packing.lengths(batch["cu_seqlens"]).tolist() == [4, 2, 0, 3]


def test_length_runs_group_equal_neighbours_only():
    assert packing.length_runs(packing.pack([[1], [2], [3, 4], [5]])["cu_seqlens"]) == [(1, 2), (2, 1), (1, 1)]


def test_token_coordinates_and_sequence_ids(batch):
    sentence, position = packing.token_coordinates(batch["cu_seqlens"])
    assert sentence.tolist() == [0, 0, 0, 0, 1, 1, 3, 3, 3] == packing.sequence_ids(batch["cu_seqlens"]).tolist()
    assert position.tolist() == [0, 1, 2, 3, 0, 1, 0, 1, 2]


def test_pad_and_unpad_round_trip(batch):
    x = torch.randn(9, 2, 3, generator=torch.Generator().manual_seed(0))  # [total_tokens, heads, dim]
    slots = packing.padding_slots(batch["cu_seqlens"], 4)
    padded = packing.pad(x, slots, 4, 4)  # [batch, heads, longest, dim]
    assert padded.shape == (4, 2, 4, 3) and torch.equal(padded[1, :, :2], x[4:6].transpose(0, 1))
    assert not padded[1, :, 2:].any() and not padded[2].any()  # zeros past each end, and for the empty sentence
    assert torch.equal(packing.unpad(padded, slots), x)


def test_key_padding_mask(batch):
    mask = packing.key_padding_mask(batch["cu_seqlens"], 4)[:, 0, 0]
    assert mask.tolist() == [[True] * 4, [True, True, False, False], [False] * 4, [True, True, True, False]]


def test_split_keeps_order_and_views(batch):
    pieces = packing.split(batch, 3)
    assert [piece["cu_seqlens"].tolist() for piece in pieces] == [[0, 4, 6, 6], [0, 3]]
    assert [piece["longest"] for piece in pieces] == [4, 3]
    assert torch.equal(torch.cat([piece["input_ids"] for piece in pieces]), batch["input_ids"])
