"""Every pooling mode on the packed layout equals a plain computation on the padded batch."""

import json

import pytest
import torch
import torch.nn.functional as F

from minilm import pooling


@pytest.fixture(autouse=True)
def seeded():
    """Every test draws its random inputs from the same seed: a failure repeats."""
    torch.manual_seed(0)


def pad(tokens, cu_seqlens, max_len):
    """[total_tokens, dim] -> [batch, max_len, dim], one sentence at a time, zeros after its end."""
    padded = tokens.new_zeros(len(cu_seqlens) - 1, max_len, tokens.shape[1])
    for index, (start, end) in enumerate(zip(cu_seqlens[:-1].tolist(), cu_seqlens[1:].tolist())):
        padded[index, : end - start] = tokens[start:end]
    return padded


def padded_reference(tokens, cu_seqlens, mode):
    """The textbook formulas over a [batch, max_len, dim] tensor and a 0/1 mask."""
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    max_len = int(lengths.max())
    padded = pad(tokens, cu_seqlens, max_len).double()  # [batch, max_len, dim]
    mask = (torch.arange(max_len)[None, :] < lengths[:, None]).double()[..., None]  # [batch, max_len, 1]
    if mode == "cls":
        return padded[:, 0]
    if mode == "lasttoken":
        return padded[torch.arange(len(lengths)), lengths - 1]
    if mode == "max":
        return padded.masked_fill(mask == 0, float("-inf")).max(dim=1).values
    if mode == "mean":
        return (padded * mask).sum(1) / mask.sum(1)
    if mode == "mean_sqrt_len_tokens":
        return (padded * mask).sum(1) / mask.sum(1).sqrt()
    if mode == "weightedmean":
        weights = torch.arange(1, max_len + 1, dtype=torch.float64)[None, :, None] * mask
        return (padded * weights).sum(1) / weights.sum(1)
    raise AssertionError(mode)


def random_batch():
    lengths = [1] + torch.randint(1, 30, (int(torch.randint(1, 8, ())),)).tolist()
    cu_seqlens = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32)
    return torch.randn(int(cu_seqlens[-1]), 16), cu_seqlens


@pytest.mark.parametrize("mode", pooling.MODES)
def test_each_mode_matches_padded_reference(mode):
    for _ in range(3):  # three random batches
        tokens, cu_seqlens = random_batch()
        got = pooling.pool(tokens, cu_seqlens, (mode,))
        assert got.shape == (len(cu_seqlens) - 1, 16)
        assert torch.allclose(got.double(), padded_reference(tokens, cu_seqlens, mode), atol=1e-5)


def test_modes_concatenate_in_order_and_normalize():
    tokens, cu_seqlens = random_batch()
    modes = ("cls", "mean", "max")
    got = pooling.pool(tokens, cu_seqlens, modes, normalize=True)
    expected = torch.cat([padded_reference(tokens, cu_seqlens, m) for m in modes], dim=-1)
    assert torch.allclose(got.double(), F.normalize(expected, dim=-1), atol=1e-5)


def test_mean_pool_gradient_matches_reference():
    tokens, cu_seqlens = random_batch()
    tokens = tokens.double().requires_grad_()
    weights = torch.randn(len(cu_seqlens) - 1, 16, dtype=torch.float64)
    (grad,) = torch.autograd.grad((pooling.mean_pool(tokens, cu_seqlens) * weights).sum(), tokens)
    (expected,) = torch.autograd.grad((padded_reference(tokens, cu_seqlens, "mean") * weights).sum(), tokens)
    assert torch.allclose(grad, expected, atol=1e-10)


@pytest.mark.parametrize("config, modes", [
    ({"word_embedding_dimension": 384, "pooling_mode_mean_tokens": True, "pooling_mode_cls_token": False}, ("mean",)),
    ({"word_embedding_dimension": 8, "pooling_mode_cls_token": True, "pooling_mode_max_tokens": True}, ("cls", "max")),
    ({"embedding_dimension": 8, "pooling_mode": "lasttoken"}, ("lasttoken",)),
    ({"embedding_dimension": 8, "pooling_mode": ["weightedmean", "cls"]}, ("weightedmean", "cls")),
])
def test_reads_legacy_and_new_configs(tmp_path, config, modes):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config))
    assert pooling.read_pooling_config(path) == modes


def test_bad_config_names_the_file(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"pooling_mode": "median"}))
    with pytest.raises(ValueError, match="median"):
        pooling.read_pooling_config(path)


def test_written_config_is_read_back_by_sentence_transformers(tmp_path):
    pytest.importorskip("sentence_transformers")
    from sentence_transformers.sentence_transformer.modules import Pooling as st_pooling
    for modes in [("mean",), ("cls", "max"), ("mean_sqrt_len_tokens",), ("weightedmean",), ("lasttoken",)]:
        (tmp_path / "config.json").write_text(json.dumps(pooling.pooling_config(modes, 8)))
        loaded = st_pooling.load(str(tmp_path))
        assert pooling.read_pooling_config(tmp_path / "config.json") == modes
        tokens, cu_seqlens = random_batch()
        tokens = tokens[:, :8].contiguous()
        lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
        padded = pad(tokens, cu_seqlens, int(lengths.max()))
        mask = (torch.arange(padded.shape[1])[None, :] < lengths[:, None]).long()
        theirs = loaded({"token_embeddings": padded, "attention_mask": mask})["sentence_embedding"]
        assert torch.allclose(pooling.pool(tokens, cu_seqlens, modes), theirs, atol=1e-5), modes
