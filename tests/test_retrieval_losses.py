"""False-negative masking in the in-batch-negative losses: equal to an explicit loop (values and gradients),
with the cached loss, and with candidates gathered from 2 ranks (gloo)."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from losses import CachedMultipleNegativesRankingLoss, MultipleNegativesRankingLoss
from losses.mnrl import text_ids
from minilm.packing import pack


@pytest.fixture(scope="module")
def tiny_model(tiny_model_dir):
    """conftest's tiny random BERT (2 layers, width 64, real tokenizer, no dropout), loaded as a user's model is."""
    import minilm

    return minilm.load(str(tiny_model_dir), device="cpu")


def test_text_ids_equal_exactly_for_equal_token_lists():
    """The reference: exact comparison of the token lists (including a prefix and a same-sum permutation)."""
    lists = [[101, 7, 8, 102], [101, 7, 8, 102], [101, 8, 7, 102], [101, 7, 8], [101, 7, 8, 102, 0], [5],
             [101, 7, 8, 102], [5], list(range(1, 600))]
    ids = text_ids(pack(lists))
    for i, a in enumerate(lists):
        for j, b in enumerate(lists):
            assert bool(ids[i] == ids[j]) == (a == b), (i, j)
    assert ids.dtype == torch.long and len(ids) == len(lists)


def masked_loop(scale, texts, margin=None, symmetric=False):
    """Cross-entropy over each anchor's candidates, leaving out by hand every candidate (not its own positive)
    whose text is the anchor's or its positive's, or that scores above the positive minus margin."""

    def cos(a, b):
        return (a @ b) / (a.norm() * b.norm())

    def direction(queries, candidates, query_texts, own_texts, candidate_texts):
        total = 0
        for i in range(len(queries)):
            positive = cos(queries[i], candidates[i])
            kept = []
            for j in range(len(candidates)):
                similarity = cos(queries[i], candidates[j])
                if j != i and (candidate_texts[j] in (query_texts[i], own_texts[i])
                               or (margin is not None and similarity.item() > positive.item() - margin)):
                    continue
                kept.append(scale * similarity)
            total = total - (scale * positive - torch.logsumexp(torch.stack(kept), 0))
        return total / len(queries)

    def value(embeddings):
        anchors, candidates = embeddings[0], torch.cat(embeddings[1:])
        loss = direction(anchors, candidates, texts[0], texts[1], [t for column in texts[1:] for t in column])
        if symmetric:
            back = direction(embeddings[1], anchors, texts[1], texts[0], texts[0])
            loss = (loss + back) / 2
        return loss
    return value


def batch_texts(columns, batch):
    """Columns of texts drawn from a small pool, so that duplicates across rows and columns are many."""
    pool = [f"t{i}" for i in range(batch + 2)]
    generator = torch.Generator().manual_seed(columns * 100 + batch)
    return [[pool[int(i)] for i in torch.randint(len(pool), (batch,), generator=generator)] for _ in range(columns)]


def as_ids(texts):
    return [torch.tensor([int(t[1:]) for t in column]) for column in texts]


@pytest.mark.parametrize("columns", [2, 3])
@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("margin", [None, 0.1])
def test_masking_equals_explicit_loop(columns, symmetric, margin):
    texts = batch_texts(columns, 7)
    embeddings = [torch.randn(7, 8, dtype=torch.float64, requires_grad=True) for _ in range(columns)]
    loss_fn = MultipleNegativesRankingLoss(None, scale=13.0, symmetric=symmetric, false_negative_margin=margin)
    value = loss_fn.compute_loss_from_embeddings(embeddings, None, as_ids(texts))
    expected = masked_loop(13.0, texts, margin, symmetric)(embeddings)
    assert torch.allclose(value, expected, atol=1e-10, rtol=1e-10)
    for got, want in zip(torch.autograd.grad(value, embeddings), torch.autograd.grad(expected, embeddings)):
        assert torch.allclose(got, want, atol=1e-10)
    # The control: with duplicates in the batch, the unmasked loss differs.
    plain = MultipleNegativesRankingLoss(None, scale=13.0, symmetric=symmetric).compute_loss_from_embeddings(
        embeddings)
    assert not torch.allclose(plain, value)


def test_masking_off_is_the_plain_loss():
    texts = batch_texts(2, 6)
    embeddings = [torch.randn(6, 8, dtype=torch.float64) for _ in range(2)]
    off = MultipleNegativesRankingLoss(None, mask_duplicates=False)
    assert off.text_ids([pack([[1, 2]])] * 2) is None
    unique = as_ids([[f"t{i}" for i in range(6)], [f"t{i + 6}" for i in range(6)]])
    masked_unique = MultipleNegativesRankingLoss(None).compute_loss_from_embeddings(embeddings, None, unique)
    assert torch.equal(masked_unique, off.compute_loss_from_embeddings(embeddings))  # no duplicate: nothing masked
    duplicated = MultipleNegativesRankingLoss(None).compute_loss_from_embeddings(embeddings, None, as_ids(texts))
    assert not torch.equal(duplicated, masked_unique)


def test_cached_loss_masks_like_the_plain_loss(tiny_model):
    model = tiny_model
    """Same duplicates, a tiny model: cached (mini-batches of 3) and plain losses and gradients agree."""
    anchors = ["a cat sits", "a dog runs", "a cat sits", "rain falls", "the sun shines", "a dog runs"]
    positives = ["a cat is sitting", "a dog is running", "a cat is sitting", "it rains", "a dog runs",
                 "a dog is running"]
    features = [model.tokenize(anchors), model.tokenize(positives)]
    model.eval()  # dropout off: the plain and cached passes would draw different masks

    def loss_and_grads(loss_fn):
        model.zero_grad()
        loss = loss_fn(features)
        loss.backward()
        return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    plain_loss, plain_grads = loss_and_grads(MultipleNegativesRankingLoss(model, false_negative_margin=0.3))
    cached_loss, cached_grads = loss_and_grads(
        CachedMultipleNegativesRankingLoss(model, mini_batch_size=3, false_negative_margin=0.3))
    unmasked_loss, _ = loss_and_grads(MultipleNegativesRankingLoss(model, mask_duplicates=False))
    model.zero_grad()
    assert abs(plain_loss - cached_loss) < 1e-5 and abs(plain_loss - unmasked_loss) > 1e-2
    assert plain_grads.keys() == cached_grads.keys() and len(plain_grads) > 20
    for name in plain_grads:
        assert (plain_grads[name] - cached_grads[name]).abs().max() < 1e-5, name


RANK_SCRIPT = textwrap.dedent('''
    import json, sys, torch, torch.distributed as dist
    from losses import MultipleNegativesRankingLoss
    rank, init, out, symmetric = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4] == "1"
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    full = torch.load(sys.argv[5], weights_only=True)
    rows = slice(rank * 4, rank * 4 + 4)
    embeddings = [e[rows].clone().requires_grad_() for e in full["embeddings"]]
    ids = [i[rows] for i in full["ids"]]
    loss_fn = MultipleNegativesRankingLoss(None, scale=9.0, symmetric=symmetric, gather_across_devices=True,
                                           false_negative_margin=0.2)
    loss = loss_fn.compute_loss_from_embeddings(embeddings, None, ids)
    loss.backward()
    json.dump({"loss": float(loss), "grads": [e.grad.tolist() for e in embeddings]}, open(out, "w"))
    dist.destroy_process_group()
''')


@pytest.mark.parametrize("symmetric", [True])  # both directions gathered and masked; one run (2 processes)
def test_gathered_masking_equals_one_process_with_the_global_batch(tmp_path, symmetric):
    texts = batch_texts(3, 8)
    full = {"embeddings": [torch.randn(8, 8, dtype=torch.float64) for _ in range(3)], "ids": as_ids(texts)}
    torch.save(full, tmp_path / "full.pt")
    (tmp_path / "rank.py").write_text(RANK_SCRIPT)
    init = f"file://{tmp_path / 'rendezvous'}"
    processes = [subprocess.Popen([sys.executable, str(tmp_path / "rank.py"), str(rank), init,
                                   str(tmp_path / f"rank{rank}.json"), str(int(symmetric)), str(tmp_path / "full.pt")],
                                  env=os.environ.copy(), stderr=subprocess.PIPE, text=True) for rank in range(2)]
    for process in processes:
        assert process.wait(timeout=120) == 0, process.stderr.read()[-2000:]
    ranks = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in range(2)]

    embeddings = [e.clone().requires_grad_() for e in full["embeddings"]]
    loss = MultipleNegativesRankingLoss(None, scale=9.0, symmetric=symmetric, false_negative_margin=0.2)
    value = loss.compute_loss_from_embeddings(embeddings, None, full["ids"])
    value.backward()
    # The global loss is the mean of the ranks' losses; each rank's gradient is that of the sum of all ranks'
    # losses with respect to its own rows (GatherWithGrad), i.e. twice the global loss's gradient.
    assert abs(float(value.detach()) - (ranks[0]["loss"] + ranks[1]["loss"]) / 2) < 1e-10
    for column, embedding in enumerate(embeddings):
        gathered = torch.cat([torch.tensor(r["grads"][column], dtype=torch.float64) for r in ranks]) / 2
        assert torch.allclose(gathered, embedding.grad, atol=1e-10), column
