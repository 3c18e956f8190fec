"""MatryoshkaLoss: its maths against an explicit loop over dimensions, against sentence-transformers' MatryoshkaLoss,
the cached loss against the plain one on the real weights (no extra encoder pass), and its one-line refusals."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from losses import (CachedMultipleNegativesRankingLoss, CoSENTLoss, CosineSimilarityLoss, MatryoshkaLoss, MSELoss,
                    MultipleNegativesRankingLoss, SoftmaxLoss)
from test_losses import mnrl_loop

DIM = 8


class Stub(nn.Module):
    """What MatryoshkaLoss needs of a model to be built: its embedding size."""
    embedding_dim = DIM


def cosine_loop(embeddings, labels):
    u, v = embeddings
    return sum((F.cosine_similarity(u[i], v[i], dim=0) - labels[i]) ** 2 for i in range(len(u))) / len(u)


def cosent_loop(scale):
    def value(embeddings, labels):
        u, v = embeddings
        cos = [F.cosine_similarity(u[i], v[i], dim=0) * scale for i in range(len(u))]
        terms = [torch.zeros((), dtype=u.dtype)]
        terms += [cos[j] - cos[i] for i in range(len(u)) for j in range(len(u)) if labels[i] > labels[j]]
        return torch.logsumexp(torch.stack(terms), 0)
    return value


def mse_loop(embeddings, labels):
    student = embeddings[0]
    return sum((student[i, d] - labels[i, d]) ** 2 for i in range(student.shape[0])
               for d in range(student.shape[1])) / student.numel()


# (inner loss, explicit loop of the inner loss on one set of embeddings, text columns, labels)
CASES = {
    "mnrl": (lambda m: MultipleNegativesRankingLoss(m, scale=13.0), mnrl_loop(13.0), 3, None),
    "mnrl-dot": (lambda m: MultipleNegativesRankingLoss(m, scale=0.5, similarity="dot"), mnrl_loop(0.5, dot=True),
                 2, None),
    "cosine": (CosineSimilarityLoss, cosine_loop, 2, "score"),
    "cosent": (lambda m: CoSENTLoss(m, scale=20.0), cosent_loop(20.0), 2, "rank"),
    "mse": (MSELoss, mse_loop, 1, "teacher"),
}


def make_labels(kind, batch, dtype=torch.float64):
    if kind == "score":
        return torch.rand(batch, dtype=dtype)
    if kind == "rank":
        return torch.randint(0, 4, (batch,)).to(dtype)  # ties included
    if kind == "teacher":
        return torch.randn(batch, DIM, dtype=dtype)
    return None


@pytest.mark.parametrize("name", CASES)
def test_the_loss_is_the_weighted_sum_of_the_inner_loss_on_each_cut(name):
    """Values and gradients equal a loop over dimensions of the inner loss's explicit loop on the embeddings cut
    by hand (the teacher's too, for mse), with weights; dimensions in no particular order."""
    build, loop, columns, label_kind = CASES[name]
    torch.manual_seed(len(name))
    dims, weights = (3, DIM, 5), (0.5, 1.0, 2.0)
    stub = Stub()
    loss_fn = MatryoshkaLoss(stub, build(stub), dims, weights)
    embeddings = [torch.randn(6, DIM, dtype=torch.float64, requires_grad=True) for _ in range(columns)]
    labels = make_labels(label_kind, 6)
    value = loss_fn.compute_loss_from_embeddings(embeddings, labels)
    expected = 0
    for dim, weight in zip(dims, weights):
        cut = [embedding[:, :dim] for embedding in embeddings]
        expected = expected + weight * loop(cut, labels[:, :dim] if label_kind == "teacher" else labels)
    # float64; the same bound as tests/test_losses.py's explicit loops.
    assert torch.allclose(value, expected, atol=5e-14, rtol=1e-14)
    for got, want in zip(torch.autograd.grad(value, embeddings), torch.autograd.grad(expected, embeddings)):
        assert torch.allclose(got, want, atol=5e-14, rtol=1e-14)
    # The control: the full-size loss alone is another number.
    alone = build(stub).compute_loss_from_embeddings(embeddings, labels)
    assert not torch.allclose(value, alone)


@pytest.mark.parametrize("name, ours, columns, label_kind", [
    ("MultipleNegativesRankingLoss", MultipleNegativesRankingLoss, 3, None),
    ("CosineSimilarityLoss", CosineSimilarityLoss, 2, "score"),
    ("CoSENTLoss", CoSENTLoss, 2, "rank"),
])
def test_equal_to_sentence_transformers(name, ours, columns, label_kind):
    """The same embeddings through sentence-transformers' MatryoshkaLoss (which re-normalizes each cut: the same
    numbers for these cosine losses) and ours: values and gradients with respect to the embeddings."""
    pytest.importorskip("sentence_transformers")
    from sentence_transformers.sentence_transformer import losses as st_losses

    class Table(nn.Module):  # a sentence-transformers model whose "embedding" of a batch is the batch's tensor
        def __init__(self):
            super().__init__()
            self.dummy = nn.Linear(1, 1)

        def forward(self, features):
            return {"sentence_embedding": features["embedding"]}

        def _get_untruncated_embedding_dimension(self):
            return DIM

        def get_embedding_dimension(self):
            return DIM

        get_sentence_embedding_dimension = get_embedding_dimension

    torch.manual_seed(len(name))
    dims, weights = [DIM, 5, 2], [1.0, 0.5, 2.0]
    embeddings = [torch.randn(6, DIM, requires_grad=True) for _ in range(columns)]
    labels = make_labels(label_kind, 6, torch.float32)
    table = Table()
    theirs = st_losses.MatryoshkaLoss(table, getattr(st_losses, name)(table), dims, weights)
    expected = theirs([{"embedding": e} for e in embeddings], labels)
    expected_grads = torch.autograd.grad(expected, embeddings)
    stub = Stub()
    got = MatryoshkaLoss(stub, ours(stub), dims, weights).compute_loss_from_embeddings(embeddings, labels)
    grads = torch.autograd.grad(got, embeddings)
    # float32 (a cut of 2 dimensions has a small norm, and the cosine's gradient grows as its inverse); over 300
    # seeds measured at most 2.6e-6 apart (relative), gradients 8.2e-6 of their largest entry.
    assert torch.allclose(got, expected, rtol=1e-5, atol=0)
    for mine, reference in zip(grads, expected_grads):
        assert (mine - reference).abs().max() <= 3e-5 * reference.abs().max()


def test_cached_matryoshka_equals_plain_matryoshka_on_the_real_weights(model):
    """Matryoshka over cached-mnrl (mini-batches of 3) gives Matryoshka over mnrl's loss and parameter gradients,
    and embeds each text exactly as often as cached-mnrl alone does (twice): every dimension works on the cached
    embeddings, never in another encoder pass. Matryoshka over mnrl embeds each column once."""
    torch.manual_seed(7)
    words = "a cat dog runs sits on the mat red blue car tree sky road city".split()
    texts = [" ".join(words[int(i)] for i in torch.randint(0, len(words), (int(n),))) + f" {row}"
             for row, n in enumerate(torch.randint(3, 9, (16,)))]
    features = [model.tokenize(texts[:8]), model.tokenize(texts[8:])]
    encoded = []
    hook = model.encoder.register_forward_hook(lambda module, args, output: encoded.append(len(args[1]) - 1))
    dims, weights = (384, 128, 32), (1.0, 0.5, 2.0)

    def run(loss_fn):
        encoded.clear()
        model.zero_grad(set_to_none=True)
        loss = loss_fn(features)
        loss.backward()
        grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
        return float(loss.detach()), grads, sum(encoded)

    try:
        assert not model.training  # dropout off: the cached loss's second pass must draw what the first did
        plain, plain_grads, plain_rows = run(MatryoshkaLoss(model, MultipleNegativesRankingLoss(model), dims, weights))
        cached, cached_grads, cached_rows = run(
            MatryoshkaLoss(model, CachedMultipleNegativesRankingLoss(model, mini_batch_size=3), dims, weights))
        _, _, cached_alone_rows = run(CachedMultipleNegativesRankingLoss(model, mini_batch_size=3))
    finally:
        hook.remove()
        model.zero_grad(set_to_none=True)
    assert plain_rows == 16 and cached_rows == cached_alone_rows == 32
    # Measured: losses equal; gradients at most 1.1e-6 of their tensor's largest entry apart (6.9e-6 on a largest
    # gradient of 6.5: float32 sums over 16 texts, in another order), so: 1e-5 relative to it.
    assert abs(plain - cached) < 1e-5
    assert plain_grads.keys() == cached_grads.keys() and len(plain_grads) == 77  # 6 layers x 12, embeddings 5
    for name in plain_grads:
        scale = max(1.0, float(plain_grads[name].abs().max()))
        assert (plain_grads[name] - cached_grads[name]).abs().max() <= 1e-5 * scale, name
    # The control: the full size alone gives another loss.
    alone = float(MultipleNegativesRankingLoss(model)(features).detach())
    assert abs(alone - plain) > 1e-2


def test_it_reads_what_its_inner_loss_reads_and_holds_each_weight_once(tiny_model_dir):
    """train.py feeds it from its inner loss's declarations; its state and parameters are the model's, once, under
    `model.` (as for any loss: train.py keeps a loss's own state apart by that prefix); replacing loss_fn.model (DDP
    under torchrun) reaches the inner loss, which runs the model."""
    import minilm

    model = minilm.load(str(tiny_model_dir), device="cpu")
    for inner in (MultipleNegativesRankingLoss(model), CoSENTLoss(model), MSELoss(model)):
        loss_fn = MatryoshkaLoss(model, inner, [64, 16])
        for name in ("text_columns", "extra_text_columns", "label", "score_range", "in_batch_negatives"):
            assert getattr(loss_fn, name) == getattr(inner, name), name
        assert hasattr(loss_fn, "needs_unique_texts") == hasattr(inner, "needs_unique_texts")
        assert set(loss_fn.state_dict()) == {f"model.{key}" for key in model.state_dict()}
        assert [name for name, _ in loss_fn.named_parameters()] == [f"model.{n}" for n, _ in model.named_parameters()]
        assert loss_fn.config()["loss"] == type(inner).__name__ and "Matryoshka" in loss_fn.citation
        wrapped = nn.Sequential(model)
        loss_fn.model = wrapped
        assert inner.model is wrapped and loss_fn.model is wrapped
    assert MatryoshkaLoss(model, MultipleNegativesRankingLoss(model), [64]).needs_unique_texts({}) is False


@pytest.mark.parametrize("dims, weights, message", [
    ([384, 16], None, "above the model's embedding size 64"),
    ([64, 0], None, "0 is not a positive whole number"),
    ([64, -8], None, "-8 is not a positive whole number"),
    ([64, 16.0], None, "16.0 is not a positive whole number"),
    ([64, True], None, "True is not a positive whole number"),
    ([64, 32, 64], None, "64 is given twice"),
    ([], None, "no dimension"),
    ("64", None, "expected whole numbers from 1 to 64"),
    ([64, 32], [1.0], "1 weight(s) for 2 dimension(s)"),
    ([64, 32], [1.0, 0.0], "0.0 is not a number > 0"),
    ([64, 32], [1.0, float("nan")], "nan is not a number > 0"),
])
def test_bad_dimensions_and_weights_are_one_line_errors(tiny_model_dir, dims, weights, message):
    import minilm

    model = minilm.load(str(tiny_model_dir), device="cpu")
    with pytest.raises(ValueError) as error:
        MatryoshkaLoss(model, MultipleNegativesRankingLoss(model), dims, weights)
    assert message in str(error.value) and "\n" not in str(error.value)


def test_losses_that_cannot_be_cut_are_refused_by_name(tiny_model_dir):
    import minilm

    model = minilm.load(str(tiny_model_dir), device="cpu")
    with pytest.raises(ValueError, match="cannot wrap SoftmaxLoss") as error:
        MatryoshkaLoss(model, SoftmaxLoss(model), [64, 32])
    assert "\n" not in str(error.value)
    with pytest.raises(ValueError, match="built on another model"):
        MatryoshkaLoss(model, CoSENTLoss(Stub()), [64, 32])


def test_dimensions_in_any_order_give_the_same_loss():
    torch.manual_seed(3)
    stub = Stub()
    embeddings = [torch.randn(5, DIM, dtype=torch.float64) for _ in range(2)]
    descending = MatryoshkaLoss(stub, MultipleNegativesRankingLoss(stub), [8, 4, 2], [1, 2, 3])
    shuffled = MatryoshkaLoss(stub, MultipleNegativesRankingLoss(stub), [2, 8, 4], [3, 1, 2])
    assert torch.allclose(descending.compute_loss_from_embeddings(embeddings),
                          shuffled.compute_loss_from_embeddings(embeddings), atol=1e-14, rtol=1e-14)
