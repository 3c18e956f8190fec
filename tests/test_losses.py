"""Each loss against an explicit-loop computation (values and gradients), and against sentence-transformers."""

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from losses import (CachedMultipleNegativesRankingLoss, CoSENTLoss, CosineSimilarityLoss,
                    MultipleNegativesRankingLoss, SoftmaxLoss)


@pytest.fixture(autouse=True)
def seeded():
    """Every test draws its random inputs from the same seed: a failure repeats."""
    torch.manual_seed(0)


def cosine(a, b):
    return float((a @ b) / (a.norm() * b.norm()))


def random_embeddings(columns, batch=6, dim=8):
    return [torch.randn(batch, dim, dtype=torch.float64, requires_grad=True) for _ in range(columns)]


def check(loss_fn, embeddings, labels, loop_value):
    """The loss and its gradients equal the explicit loop's, which autograd differentiates independently."""
    value = loss_fn.compute_loss_from_embeddings(embeddings, labels)
    expected = loop_value(embeddings, labels)
    # float64; measured at most 1.6e-14 apart (values and gradients) over repeated random draws.
    assert torch.allclose(value, expected, atol=5e-14, rtol=1e-14)
    grads = torch.autograd.grad(value, embeddings)
    expected_grads = torch.autograd.grad(expected, embeddings)
    for got, want in zip(grads, expected_grads):
        assert torch.allclose(got, want, atol=5e-14, rtol=1e-14)


def mnrl_loop(scale, symmetric=False, dot=False):
    def similarity(a, b):
        return a @ b if dot else (a @ b) / (a.norm() * b.norm())

    def value(embeddings, labels):
        anchors, candidates = embeddings[0], torch.cat(embeddings[1:])
        total = 0
        for i in range(len(anchors)):
            scores = [scale * similarity(anchors[i], candidates[j]) for j in range(len(candidates))]
            total = total - (scores[i] - torch.logsumexp(torch.stack(scores), 0))
        loss = total / len(anchors)
        if symmetric:
            back = 0
            for i in range(len(anchors)):
                scores = [scale * similarity(embeddings[1][i], anchors[j]) for j in range(len(anchors))]
                back = back - (scores[i] - torch.logsumexp(torch.stack(scores), 0))
            loss = (loss + back / len(anchors)) / 2
        return loss
    return value


@pytest.mark.parametrize("columns", [2, 3, 4])
@pytest.mark.parametrize("symmetric", [False, True])
def test_mnrl(columns, symmetric):
    scale = float(torch.empty(()).uniform_(5, 30))
    loss_fn = MultipleNegativesRankingLoss(None, scale=scale, symmetric=symmetric)
    check(loss_fn, random_embeddings(columns), None, mnrl_loop(scale, symmetric))


def test_mnrl_dot_product():
    loss_fn = MultipleNegativesRankingLoss(None, scale=1.0, similarity="dot")
    check(loss_fn, random_embeddings(2), None, mnrl_loop(1.0, dot=True))
    with pytest.raises(ValueError, match="similarity"):
        MultipleNegativesRankingLoss(None, similarity="euclid")


def test_cosine_similarity_loss():
    labels = torch.rand(6, dtype=torch.float64)

    def loop(embeddings, labels):
        u, v = embeddings
        return sum((F.cosine_similarity(u[i], v[i], dim=0) - labels[i]) ** 2 for i in range(len(u))) / len(u)

    check(CosineSimilarityLoss(None), random_embeddings(2), labels, loop)


def test_cosent_loss():
    labels = torch.randint(0, 4, (7,)).double()  # ties included: tied pairs add nothing
    scale = 20.0

    def loop(embeddings, labels):
        u, v = embeddings
        cos = [F.cosine_similarity(u[i], v[i], dim=0) * scale for i in range(len(u))]
        terms = [torch.zeros((), dtype=torch.float64)]
        for i in range(len(u)):
            for j in range(len(u)):
                if labels[i] > labels[j]:
                    terms.append(cos[j] - cos[i])
        return torch.logsumexp(torch.stack(terms), 0)

    check(CoSENTLoss(None, scale=scale), random_embeddings(2, batch=7), labels, loop)


def test_softmax_loss():
    class Stub(nn.Module):
        embedding_dim = 8

    loss_fn = SoftmaxLoss(Stub(), num_labels=3).double()
    labels = torch.randint(0, 3, (6,))

    def loop(embeddings, labels):
        u, v = embeddings
        total = 0
        for i in range(len(u)):
            features = torch.cat([u[i], v[i], (u[i] - v[i]).abs()])
            logits = loss_fn.classifier.weight @ features + loss_fn.classifier.bias
            total = total - (logits[labels[i]] - torch.logsumexp(logits, 0))
        return total / len(u)

    check(loss_fn, random_embeddings(2), labels, loop)


def test_softmax_classifier_saves_and_loads(tmp_path):
    class Stub(nn.Module):
        embedding_dim = 8

    loss_fn = SoftmaxLoss(Stub(), num_labels=3)
    loss_fn.save(tmp_path)
    loaded = SoftmaxLoss.load_classifier(tmp_path)
    assert torch.equal(loaded.weight, loss_fn.classifier.weight)
    with pytest.raises(FileNotFoundError, match="SoftmaxLoss"):
        SoftmaxLoss.load_classifier(tmp_path / "elsewhere")


def test_gather_needs_no_process_group():
    """Outside torch.distributed, gather_across_devices is a no-op (tests/test_distributed.py covers 2 ranks)."""
    embeddings = random_embeddings(2)
    plain = MultipleNegativesRankingLoss(None).compute_loss_from_embeddings(embeddings)
    gathered = MultipleNegativesRankingLoss(None, gather_across_devices=True).compute_loss_from_embeddings(embeddings)
    assert torch.equal(plain, gathered)


@pytest.mark.parametrize("name, ours, kwargs", [
    ("MultipleNegativesRankingLoss", MultipleNegativesRankingLoss, {}),
    ("CoSENTLoss", CoSENTLoss, {}),
    ("CosineSimilarityLoss", CosineSimilarityLoss, {}),
])
def test_equal_to_sentence_transformers(name, ours, kwargs):
    pytest.importorskip("sentence_transformers")
    from sentence_transformers.sentence_transformer import losses as st_losses

    class Stub(nn.Module):  # what sentence-transformers' losses need of a model at construction
        def __init__(self):
            super().__init__()
            self.dummy = nn.Linear(1, 1)

        def get_sentence_embedding_dimension(self):
            return 8

    theirs = getattr(st_losses, name)(Stub())
    embeddings = [torch.randn(6, 8) for _ in range(2 if name != "MultipleNegativesRankingLoss" else 3)]
    labels = None if name == "MultipleNegativesRankingLoss" else torch.rand(6)
    expected = theirs.compute_loss_from_embeddings(embeddings, labels)
    got = ours(None, **kwargs).compute_loss_from_embeddings(embeddings, labels)
    # float32; measured at most 2.1e-7 apart (relative) over 300 random draws.
    assert math.isclose(float(got), float(expected), rel_tol=6e-7, abs_tol=1e-7)


def test_cached_mnrl_equals_plain_mnrl(tiny_model_dir, one_thread):
    """GradCache with mini-batches of 4 gives the plain loss of batch 32 and the same parameter gradients
    (on the tiny random BERT: the gradient bookkeeping is the point, not the weights)."""
    import minilm
    from minilm.model import batch_to

    model = minilm.load(str(tiny_model_dir), device="cpu")
    model.eval()  # dropout off: the plain and cached passes would draw different masks
    words = "red green blue cat dog car tree sky sea sun moon star road city".split()
    generator = torch.Generator().manual_seed(int(torch.randint(0, 10**6, ())))
    texts = [" ".join(words[i] for i in torch.randint(0, len(words), (int(torch.randint(2, 9, ())),),
                                                       generator=generator)) + f" {n}" for n in range(64)]
    features = [batch_to(model.tokenize(texts[:32]), model.device), batch_to(model.tokenize(texts[32:]), model.device)]

    def loss_and_grads(loss_fn):
        model.zero_grad(set_to_none=True)
        loss = loss_fn(features)
        loss.backward()
        grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
        return float(loss.detach()), grads

    plain_loss, plain_grads = loss_and_grads(MultipleNegativesRankingLoss(model))
    cached_loss, cached_grads = loss_and_grads(CachedMultipleNegativesRankingLoss(model, mini_batch_size=4))
    model.zero_grad(set_to_none=True)
    # Measured: losses up to 2.4e-7 apart, gradients up to 1.0e-7 (largest gradient 0.05) over every CPU kernel
    # path (ATEN_CPU_CAPABILITY, MKL_ENABLE_INSTRUCTIONS, ONEDNN_MAX_CPU_ISA forced to AVX2, SSE); bounds ~3x that.
    assert abs(plain_loss - cached_loss) < 1e-6
    assert plain_grads.keys() == cached_grads.keys() and len(plain_grads) > 20
    for name in plain_grads:
        assert (plain_grads[name] - cached_grads[name]).abs().max() < 3e-7, name


def test_losses_are_a_top_level_package_the_core_never_imports_and_declare_their_data():
    """`losses/` is its own package (installed by pyproject.toml, as the design card's top level has it), minilm
    never imports it, and every registered loss declares what train.py needs to feed it, so that train.py names
    no loss."""
    import importlib.util
    from pathlib import Path

    from losses import LOSSES
    from minilm.training_data import columns_for_loss

    repo = Path(__file__).resolve().parent.parent
    assert (repo / "losses" / "__init__.py").is_file()
    assert '"losses"' in (repo / "pyproject.toml").read_text()
    spec = importlib.util.find_spec("losses")
    assert spec is not None and str(spec.origin).startswith(str(repo)), spec
    core = [path for path in (repo / "minilm").rglob("*.py")
            if "import losses" in path.read_text() or "from losses" in path.read_text()]
    assert not core, core
    code = (repo / "train.py").read_text()
    for name in ('"mnrl"', '"cosine"', '"softmax"', "isinstance(loss_fn", "import SoftmaxLoss"):
        assert name not in code, name
    for name, loss in LOSSES.items():
        assert loss.label in (None, "score", "class", "embedding"), name
        # a teacher's embedding labels one text (distillation); the other losses compare texts
        fewest = 1 if loss.label == "embedding" else 2
        assert loss.text_columns and all(len(layout) >= fewest for layout in loss.text_columns), name
        assert isinstance(loss.in_batch_negatives, bool) and isinstance(loss.matryoshka, bool), name
        if loss.label == "class":
            assert loss.num_classes({}) >= 2
        rows = [{"sentence1": "a", "sentence2": "b", "score": 0.9, "label": 1}]
        _, columns, label = columns_for_loss(rows, loss, 0.5, "x.tsv")
        assert label == {"score": "score", "class": "label", "embedding": "embedding", None: None}[loss.label]
        assert set(columns) <= {column for layout in loss.text_columns for column in layout}, name
