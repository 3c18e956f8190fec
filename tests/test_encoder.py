"""The encoder reproduces all-MiniLM-L6-v2: parity with sentence-transformers, weight loading, bad input."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import minilm
from minilm.encoder import BertConfig, load_encoder

from conftest import MODEL_ID, REPO

FIXTURE = Path(__file__).parent / "fixtures" / "reference_embeddings.npz"
CPU_BACKENDS = ["math", "sdpa"]


@pytest.fixture(autouse=True)
def seeded():
    """Every test draws its random inputs from the same seed: a failure repeats."""
    torch.manual_seed(0)


@pytest.fixture(scope="module")
def reference(model_dir):
    """The stored sentence-transformers embeddings. The parity tests rely on its sentences covering long and odd
    inputs, so that is checked here: a regenerated fixture without them fails those tests instead of letting
    them pass on easy inputs."""
    from tokenizers import Tokenizer

    data = np.load(FIXTURE)
    sentences = [str(s) for s in data["sentences"]]
    untruncated = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    untruncated.no_truncation()
    untruncated.no_padding()
    lengths = [len(encoding.ids) for encoding in untruncated.encode_batch(sentences)]
    assert max(lengths) > 512 and sum(length > 256 for length in lengths) >= 3, "the fixture lost its long inputs"
    assert "" in sentences and any(not s.isascii() for s in sentences) and any("def " in s for s in sentences), \
        "the fixture lost its odd inputs"
    return sentences, data["embeddings"]


@pytest.mark.parametrize("backend, batch_size, token_budget", [
    *((backend, 7, True) for backend in CPU_BACKENDS),       # each backend on the whole fixture
    ("sdpa", 64, True), ("sdpa", 1, True), ("sdpa", 7, False),  # batching: large, one sentence, fixed batches
])
def test_embeddings_equal_sentence_transformers(model, reference, backend, batch_size, token_budget):
    sentences, expected = reference
    assert len(sentences) >= 200
    model.backends = {"attention": backend}
    try:
        got = model.encode(sentences, batch_size=batch_size, token_budget=token_budget)
    finally:
        model.backends = None
    assert got.dtype == np.float32 and got.shape == expected.shape
    assert np.abs(got - expected).max() < 1e-5


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_onednn_cpu_path_equals_plain_linear_path(model, reference, precision):
    """encode's oneDNN fast path (minilm/onednn.py) against its reference, the plain nn.Linear encoder."""
    from minilm import onednn

    dtype = minilm.model.PRECISIONS[precision]
    if not onednn.available("cpu", dtype or torch.float32):
        pytest.skip(f"oneDNN cannot run {precision} on this CPU (it needs "
                    f"{onednn.NEEDS.get(dtype, 'a torch build with oneDNN')})")
    sentences, expected = reference
    # half the fixture, short to longest (the whole of it runs the fast path in the parity tests above)
    sentences, expected = sentences[::2], expected[::2]
    fast = model.encode(sentences, batch_size=64, precision=precision)
    copy = model._inference_encoder(dtype, "onednn")
    assert isinstance(copy.layers[0].ffn_in, onednn.OneDNNLinear)  # the fast path really ran
    model.backends = {"linear": "plain"}
    try:
        plain = model.encode(sentences, batch_size=64, precision=precision)
    finally:
        model.backends = None
    tolerance = 1e-5 if precision == "fp32" else 6e-3  # bf16: 3x the 1.9e-3 measured
    assert np.abs(plain - fast).max() < tolerance
    if precision == "fp32":
        assert np.abs(plain - expected).max() < 1e-5



def test_import_bounds_onednn_primitive_caches_unless_the_user_set_them():
    """oneDNN keeps a primitive per batch shape in two caches, read once when it first runs: `import minilm` must
    bound both before that (a long corpus encode grew by ~0.3 MB a batch without it), and leave a user's value."""
    probe = ("import os, minilm; print(os.environ['ONEDNN_PRIMITIVE_CACHE_CAPACITY'], "
             "os.environ['LRU_CACHE_CAPACITY'])")
    env = {k: v for k, v in os.environ.items() if k not in ("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "LRU_CACHE_CAPACITY")}
    for user, expected in (({}, "64 64"), ({"LRU_CACHE_CAPACITY": "5"}, "64 5")):
        result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=REPO,
                                env={**env, **user, "PYTHONPATH": str(REPO)})
        assert result.stdout.split() == expected.split(), result.stderr
def test_live_parity_with_sentence_transformers(model, model_dir):
    """Beside the stored fixture: the installed sentence-transformers, on sentences made here and now."""
    st = pytest.importorskip("sentence_transformers")
    reference = st.SentenceTransformer(str(model_dir), device="cpu")
    rng = np.random.default_rng(0)
    words = "alpha beta gamma delta Epsilon 42 ñandú 東京 code() {x: 1} — end".split()
    sentences = [" ".join(rng.choice(words, size=rng.integers(1, 300))) for _ in range(6)]
    expected = reference.encode(sentences, convert_to_numpy=True)
    assert np.abs(model.encode(sentences, batch_size=5) - expected).max() < 1e-5


def test_attention_backends_agree_on_random_inputs():
    lengths = torch.randint(1, 40, (6,)).tolist() + [1]
    cu_seqlens = torch.tensor([0] + np.cumsum(lengths).tolist(), dtype=torch.int32)
    total, heads, dim = int(cu_seqlens[-1]), 3, 32
    q, k, v = (torch.randn(total, heads, dim, dtype=torch.float64, requires_grad=True) for _ in range(3))
    grad_out = torch.randn(total, heads, dim, dtype=torch.float64)

    def run(backend):
        out = minilm.attention.attention(q, k, v, cu_seqlens, max(lengths), backend=backend)
        return (out, *torch.autograd.grad(out, (q, k, v), grad_out))

    # An explicit loop, one sentence at a time, as the independent check of the "math" backend.
    expected = torch.cat([
        torch.softmax(q[a:b].transpose(0, 1) @ k[a:b].permute(1, 2, 0) / dim ** 0.5, -1) @ v[a:b].transpose(0, 1)
        for a, b in zip(cu_seqlens[:-1].tolist(), cu_seqlens[1:].tolist())], dim=1).transpose(0, 1)
    math_result, sdpa_result = run("math"), run("sdpa")
    assert torch.allclose(math_result[0].double(), expected, atol=1e-6)
    for a, b in zip(math_result, sdpa_result):
        assert torch.allclose(a.double(), b.double(), atol=1e-6)
    # Both ways the sdpa backend can take: padding around one call, and one call per run of equal lengths.
    runs = [(length, 1) for length in lengths]
    for out in (minilm.attention._sdpa_padded(q, k, v, cu_seqlens, max(lengths), 0.0),
                minilm.attention._sdpa_per_length_run(q, k, v, runs)):
        result = (out, *torch.autograd.grad(out, (q, k, v), grad_out))
        for a, b in zip(math_result, result):
            assert torch.allclose(a.double(), b.double(), atol=1e-6)
    with pytest.raises(ValueError, match="unknown attention backend"):
        minilm.attention.attention(q, k, v, cu_seqlens, max(lengths), backend="flash")


def test_sdpa_layout_pads_short_mixed_batches_and_runs_long_ones_per_sentence():
    """Training batches are random: many lengths. Short ones stay padded around one call; long passages (seed card
    000, up to 512 tokens) run one call per sentence, where padding to the longest would waste most of the work."""
    def layout(lengths):
        cu_seqlens = torch.tensor([0] + np.cumsum(lengths).tolist(), dtype=torch.int32)
        return minilm.attention.sdpa_runs("cpu", cu_seqlens)

    short = [8, 31, 12, 25, 40, 9, 17, 33] * 4  # 32 sentences, 8 lengths: more runs than a quarter of the batch
    assert layout(short) is None
    long = [251, 273, 357, 260, 475, 146, 301, 166, 264, 240, 512, 116, 279, 347, 117, 377]
    assert layout(long) == [(length, 1) for length in long]
    assert layout(sorted(short)) == [(length, 4) for length in sorted(set(short))]  # encode's sorted batches
    assert minilm.attention.sdpa_runs("cuda", torch.tensor([0, 300, 310], dtype=torch.int32)) is None


@torch.no_grad()
def test_stretched_keys_equal_math_attention(monkeypatch):
    """Inference on the CPU reads each run's keys and values padded to a multiple of 16 straight from the packed
    tensor (the next sentences' rows, masked out); the last sentences of a batch, without such rows after them,
    take the plain call. Both against the reference, and no sentence may see another's keys or values."""
    runs = [(30, 3), (21, 4), (16, 2), (14, 5), (5, 6), (3, 1)]  # sorted, as encode packs them
    lengths = [length for length, count in runs for _ in range(count)]
    cu_seqlens = torch.tensor([0] + np.cumsum(lengths).tolist(), dtype=torch.int32)
    total, heads, dim = int(cu_seqlens[-1]), 12, 32
    q, k, v = torch.randn(3, total, heads, dim).unbind(0)
    key_lengths = []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def spy(query, key, value, **kwargs):
        key_lengths.append((query.shape[2], key.shape[2], query.shape[0]))
        return sdpa(query, key, value, **kwargs)

    monkeypatch.setattr(minilm.attention.F, "scaled_dot_product_attention", spy)
    got = minilm.attention._sdpa_per_length_run(q, k, v, runs)
    expected = minilm.attention.attention(q, k, v, cu_seqlens, max(lengths), backend="math")
    assert torch.allclose(got, expected, atol=1e-5)
    # Runs of 30, 21 and 14 read 32, 32 and 16 keys; 16 needs no padding; of the six 5s only the first four
    # have 11 rows after them to read 16 keys (the batch ends 3 rows after the last 5), the other two go plain.
    assert (30, 32, 3) in key_lengths and (21, 32, 4) in key_lengths and (14, 16, 5) in key_lengths
    assert (16, 16, 2) in key_lengths and (3, 3, 1) in key_lengths
    stretched_fives = [entry for entry in key_lengths if entry[:2] == (5, 16)]
    plain_fives = [entry for entry in key_lengths if entry[:2] == (5, 5)]
    assert stretched_fives and plain_fives and stretched_fives[0][2] + plain_fives[0][2] == 6
    # Change one sentence's keys and values: every other sentence's output stays exactly the same.
    a, b = int(cu_seqlens[7]), int(cu_seqlens[8])  # the first 16, whose rows the last 21 reads (masked out)
    k2, v2 = k.clone(), v.clone()
    k2[a:b], v2[a:b] = torch.randn(2, b - a, heads, dim).unbind(0)
    changed = minilm.attention._sdpa_per_length_run(q, k2, v2, runs)
    assert torch.equal(changed[:a], got[:a]) and torch.equal(changed[b:], got[b:])
    assert not torch.equal(changed[a:b], got[a:b])


def test_encode_batches_fill_the_first_batch_tokens():
    lengths = [5, 40, 7, 7, 3, 12, 40, 2, 9, 9, 9, 6] * 5
    for token_budget in (True, False):
        batches = minilm.model.length_sorted_batches(lengths, 4, token_budget)
        flat = [index for batch in batches for index in batch]
        assert sorted(flat) == list(range(len(lengths)))  # every sentence once
        assert [lengths[i] for i in flat] == sorted(lengths, reverse=True)  # longest first
        first = batches[0]
        assert sorted(lengths[i] for i in first) == [40, 40, 40, 40]
        if token_budget:
            budget = sum(lengths[i] for i in first)
            assert all(sum(lengths[i] for i in batch) <= budget for batch in batches)
            assert len(batches[-1]) > 4  # short sentences share a batch
            # each batch but the last closed only because the next sentence did not fit
            for batch, following in zip(batches, batches[1:]):
                assert sum(lengths[i] for i in batch) + lengths[following[0]] > budget
        else:
            assert [len(batch) for batch in batches] == [4] * (len(lengths) // 4)
    assert minilm.model.length_sorted_batches([], 32) == []


def test_encode_batches_stop_at_max_tokens():
    lengths = [300] * 10 + [20] * 50 + [1500]
    batches = minilm.model.length_sorted_batches(lengths, 32, True, max_tokens=1000)
    assert sorted(index for batch in batches for index in batch) == list(range(len(lengths)))
    assert batches[0] == [60]  # longer than max_tokens: a batch of its own
    assert [len(batch) for batch in batches[1:5]] == [3, 3, 3, 1 + 35]  # 900 tokens, ..., 300 + 35 x 20
    assert all(sum(lengths[i] for i in batch) <= 1000 for batch in batches[1:])
    # a budget under max_tokens is kept
    assert minilm.model.length_sorted_batches(lengths, 2, True, 10_000) == minilm.model.length_sorted_batches(lengths, 2)


def test_encode_on_the_cpu_caps_tokens_per_batch_and_keeps_the_embeddings(model, monkeypatch):
    sentences = ["a sentence of a few words, repeated " * n for n in range(1, 20)]
    whole = model.encode(sentences, batch_size=32, convert_to="tensor")
    seen = []
    batches = minilm.model.length_sorted_batches
    monkeypatch.setattr(minilm.model, "length_sorted_batches", lambda *args: seen.append(args) or batches(*args))
    monkeypatch.setattr(minilm.model, "CPU_BATCH_TOKENS", 100)
    capped = model.encode(sentences, batch_size=32, convert_to="tensor")
    assert seen[0][3] == 100 and len(batches(*seen[0])) > 1
    # other row counts round differently in float32: 1.3e-7 measured (AMX, and oneDNN/MKL held to AVX2)
    torch.testing.assert_close(capped, whole, rtol=0, atol=4e-7)


def test_packed_tokens_do_not_depend_on_batch_neighbours(model):
    """The same sentence alone and beside much longer ones: the packed layout never lets padding leak in."""
    alone = model.encode(["short one"], batch_size=1)
    crowded = model.encode(["short one", "a much longer sentence " * 30, "mid length sentence here"], batch_size=3)
    assert np.abs(alone[0] - crowded[0]).max() < 1e-6


def test_encode_shapes_and_bad_input(model):
    assert model.encode([]).shape == (0, 384)
    single = model.encode("one sentence")
    assert single.shape == (384,) and abs(np.linalg.norm(single) - 1) < 1e-5
    tensor = model.encode(["x", "y"], convert_to="tensor")
    assert tensor.dtype == torch.float32 and not tensor.is_inference() and not tensor.requires_grad
    tensor.add_(1)  # an ordinary tensor: in-place changes and autograd work on it
    assert (torch.nn.Parameter(tensor) * 2).sum().requires_grad
    raw = model.encode(["a sentence"], normalize=False)
    assert abs(np.linalg.norm(raw) - 1) > 1e-3, "normalize=False skips the model's Normalize"
    with pytest.raises(TypeError, match="sentence 2 is NoneType"):
        model.encode(["a", "b", None])
    with pytest.raises(TypeError, match="sentence 1 is int"):
        model.encode(["a", 5])
    with pytest.raises(ValueError, match="convert_to"):
        model.encode(["a"], convert_to="list")
    very_long = model.encode(["word " * 5000])
    assert np.isfinite(very_long).all()


def test_similarity_is_cosine(model):
    a = model.encode(["A man eats food.", "A plane takes off."])
    b = model.encode(["Someone is eating.", "An aircraft departs.", "Nothing related at all"])
    sims = model.similarity(a, b)
    assert sims.shape == (2, 3)
    expected = (a / np.linalg.norm(a, axis=1, keepdims=True)) @ (b / np.linalg.norm(b, axis=1, keepdims=True)).T
    assert np.allclose(sims.numpy(), expected, atol=1e-6)
    assert sims[0, 0] > sims[0, 1] and sims[1, 1] > sims[1, 0]


def test_max_seq_length_override(model_dir):
    short = minilm.load(str(model_dir), device="cpu", max_seq_length=16)
    assert len(short.tokenize(["word " * 100])["input_ids"]) == 16
    with pytest.raises(ValueError, match="position embeddings"):
        short.max_seq_length = 600


# --- loading ------------------------------------------------------------------------------------------------

def _copy_model(model_dir, tmp_path) -> Path:
    target = tmp_path / "model"
    shutil.copytree(model_dir, target, ignore=shutil.ignore_patterns("README.md", "data_config.json"))
    return target


def test_bert_prefixed_key_names_load(model_dir, tmp_path, model):
    target = _copy_model(model_dir, tmp_path)
    tensors = load_file(target / "model.safetensors")
    save_file({f"bert.{key}": value for key, value in tensors.items()}, target / "model.safetensors")
    prefixed = minilm.load(str(target), device="cpu")
    assert np.array_equal(prefixed.encode(["same weights"]), model.encode(["same weights"]))


@pytest.mark.parametrize("damage, message", [
    ("missing", "missing tensor 'encoder.layer.3.output.dense.bias'"),
    ("unexpected", "unexpected tensor.*classifier.weight"),
    ("shape", "tensor for 'embeddings.word.weight' has shape"),
    ("truncated", "damaged or truncated"),
])
def test_damaged_weights_are_named_errors(model_dir, tmp_path, damage, message):
    target = _copy_model(model_dir, tmp_path)
    path = target / "model.safetensors"
    if damage == "truncated":
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    else:
        tensors = load_file(path)
        if damage == "missing":
            del tensors["encoder.layer.3.output.dense.bias"]
        elif damage == "unexpected":
            tensors["classifier.weight"] = torch.zeros(2, 384)
        else:
            tensors["embeddings.word_embeddings.weight"] = torch.zeros(100, 384)
        save_file(tensors, path)
    with pytest.raises(ValueError, match=message) as error:
        minilm.load(str(target), device="cpu")
    assert str(path) in str(error.value)


def test_missing_model_says_what_was_tried(tmp_path, monkeypatch):
    """In one line: the command-line tools print an error's first line, and every attempt belongs to the answer."""
    from huggingface_hub import constants

    with pytest.raises(FileNotFoundError) as error:
        minilm.load(str(tmp_path / "nowhere"))
    assert str(error.value) == f"cannot find model {str(tmp_path / 'nowhere')!r}: no folder {tmp_path / 'nowhere'}"
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # the cache alone: no network, and fast
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub-cache"))
    with pytest.raises(FileNotFoundError) as error:
        minilm.load("no-such-org/no-such-model-xyz")
    message = str(error.value)
    assert len(message.splitlines()) == 1, message
    assert message.startswith("cannot find model 'no-such-org/no-such-model-xyz': no folder no-such-org/no-such-mod")
    assert f"not in the local hub cache ({tmp_path / 'hub-cache'}) nor downloadable from the Hugging Face hub as " \
           "'no-such-org/no-such-model-xyz' (" in message


def test_hub_id_falls_back_to_bundled_copy(model_dir):
    model = minilm.load(MODEL_ID, device="cpu")
    assert model.source_dir.resolve() == model_dir.resolve()


def test_hub_cache_is_used_offline(model_dir, tmp_path):
    """A hub id resolves through huggingface_hub's cache with HF_HUB_OFFLINE=1, before any bundled copy."""
    repo = tmp_path / "hub" / "models--sentence-transformers--all-MiniLM-L6-v2"
    revision = "0" * 40
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(revision)
    shutil.copytree(model_dir, repo / "snapshots" / revision)
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(tmp_path / "hub"))
    code = f"import minilm.hub as h; print(h.resolve_model_dir({MODEL_ID!r}))"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == str(repo / "snapshots" / revision)


def test_runtime_never_imports_the_libraries_it_replaces():
    code = ("import sys, minilm; m = minilm.load('sentence-transformers/all-MiniLM-L6-v2', device='cpu');"
            "m.encode(['hello']); bad = [k for k in sys.modules if k.split('.')[0] in "
            "('sentence_transformers', 'transformers')]; print(bad); sys.exit(1 if bad else 0)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 0, out.stdout + out.stderr


# --- other BERT sizes: checked against transformers' BertModel on random weights --------------------------------

@pytest.mark.parametrize("sizes", [
    dict(hidden_size=384, num_hidden_layers=12, num_attention_heads=12, intermediate_size=1536),  # MiniLM-L12
    dict(hidden_size=768, num_hidden_layers=2, num_attention_heads=12, intermediate_size=3072),  # BERT-base width
    dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128, hidden_act="gelu_new"),
])
def test_other_bert_checkpoints_load_from_config(model_dir, tmp_path, sizes):
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(vocab_size=30522, **sizes)
    reference = transformers.BertModel(config).eval()
    target = tmp_path / "bert"
    reference.save_pretrained(target, safe_serialization=True)
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt"):
        shutil.copyfile(model_dir / name, target / name)
    (target / "modules.json").write_text(json.dumps([
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]))
    (target / "1_Pooling").mkdir()
    (target / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode": "mean"}))

    ours = minilm.load(str(target), device="cpu")
    assert ours.encoder.config == BertConfig(**{**BertConfig().__dict__, **sizes})
    texts = ["a short one", "a somewhat longer sentence with more words in it"]
    tokens = [torch.tensor(ids) for ids in ours.tokenizer.encode_ids(texts)]
    with torch.no_grad():
        expected = [reference(ids[None]).last_hidden_state[0].mean(0) for ids in tokens]
    assert torch.allclose(ours.encode(texts, convert_to="tensor"), torch.stack(expected), atol=1e-5)
    assert load_encoder(target).config.num_hidden_layers == sizes["num_hidden_layers"]


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_low_precision_encode_stays_close_to_fp32(model, reference, precision):
    from minilm import cpu

    sentences, expected = reference
    # Where the precision has no fast matmul (fp16 on most CPUs; bf16 on an AVX2-only CPU, ~70x slower than fp32
    # there), a slice of the fixture (short to longest) keeps the test cheap.
    if precision == "fp16" or not cpu.describe_cpu().fast(precision):
        sentences, expected = sentences[::5], expected[::5]
    got = model.encode(sentences, precision=precision)
    assert got.dtype == np.float32 and got.shape == expected.shape
    cosine = (got * expected).sum(1) / np.linalg.norm(got, axis=1) / np.linalg.norm(expected, axis=1)
    # 3x the measured 1 - cosine (bf16: 9.3e-5; fp16, plain Linears on this CPU: 1.5e-6)
    assert 1 - cosine.min() < {"bf16": 3e-4, "fp16": 5e-6}[precision], cosine.min()
    assert np.abs(got - expected).max() > 1e-6  # it really ran in low precision
    with pytest.raises(ValueError, match="precision"):
        model.encode(["x"], precision="int4")


def test_low_precision_copy_follows_weight_changes(model_dir):
    """encode keeps a cast copy of the weights; a change to the weights (an optimizer step) must reach it."""
    from minilm import onednn

    if not onednn.available("cpu", torch.bfloat16):
        pytest.skip(f"oneDNN cannot run bf16 on this CPU (it needs {onednn.NEEDS[torch.bfloat16]})")
    model = minilm.load(model_dir)
    before = model.encode("a sentence to follow", precision="bf16")
    fp32_before = model.encode("a sentence to follow")
    bf16_copy = model._inference_encoder(torch.bfloat16, "onednn")
    assert model._inference_encoder(None, "onednn") is not bf16_copy  # one copy per precision, kept across switches
    assert model._inference_encoder(torch.bfloat16, "onednn") is bf16_copy
    with torch.no_grad():
        # in place, as optimizers do (not a constant added to a bias: the LayerNorm after it would cancel that)
        model.encoder.layers[0].ffn_out.weight.mul_(2.0)
    after = model.encode("a sentence to follow", precision="bf16")
    fp32_after = model.encode("a sentence to follow")
    assert np.abs(after - before).max() > 1e-3 and np.abs(fp32_after - fp32_before).max() > 1e-3
    model.backends = {"linear": "plain"}  # the plain fp32 path runs the changed weights themselves
    assert np.abs(model.encode("a sentence to follow") - fp32_after).max() < 1e-5
    assert float(np.dot(after, fp32_after) / np.linalg.norm(after) / np.linalg.norm(fp32_after)) > 1 - 3e-4


def test_refresh_inference_copies_picks_up_a_change_torch_does_not_count(model_dir):
    """Writing through .data keeps the weight's version: encode cannot see it until the copies are dropped."""
    model = minilm.load(model_dir)
    before = model.encode("a sentence to follow")
    model.encoder.layers[0].ffn_out.weight.data.mul_(2.0)
    model.refresh_inference_copies()
    after = model.encode("a sentence to follow")
    model.backends = {"linear": "plain"}  # the live weights themselves
    assert np.abs(after - before).max() > 1e-3 and np.abs(model.encode("a sentence to follow") - after).max() < 1e-5


def test_encode_in_training_mode_sees_fused_optimizer_steps(tiny_model_dir, one_thread):
    """torch.optim.AdamW(fused=True) (torch 2.13) changes the weights in place without bumping their versions, so
    the key of encode's inference copy cannot see its steps; encode of a model in training mode (a training loop
    evaluating) makes the copy again every time, and so embeds with the weights the optimizer left."""
    from minilm import onednn

    if not onednn.available("cpu", torch.float32):
        pytest.skip("oneDNN is not in this torch: fp32 encode runs the live weights, there is no copy to go stale")
    model = minilm.load(tiny_model_dir, device="cpu").train()
    texts = ["a sentence to follow", "and another one, a little longer"]
    before = model.encode(texts)
    assert model._inference_copies  # fp32 on the CPU ran a copy (oneDNN Linears): the one that could go stale
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=True)
    batch = model.tokenize(texts)
    for _ in range(2):
        model(batch, normalize=False).pow(2).sum().backward()  # unnormalized: a loss with a gradient
        optimizer.step()
        optimizer.zero_grad()
    after = model.encode(texts)
    assert model.training  # encode gave the model back in the mode it found it in
    model.backends = {"linear": "plain"}  # fp32, plain Linears: the live weights themselves, no copy
    assert np.abs(after - before).max() > 1e-3
    assert np.abs(model.encode(texts) - after).max() < 1e-5


def test_bf16_attention_runs_in_float32_on_the_cpu_for_short_batches_without_autograd(monkeypatch):
    """A bf16 encode on the CPU computes attention on float32 q, k, v when the batch's longest sentence is shorter
    than SHORT_BATCH (one cast of the qkv output: faster there, benchmarks/README.md) and hands the out projection
    bf16 again; on longer batches, and with autograd (training under autocast), it stays bf16. Either way the
    layer stays within bf16 rounding of the float32 reference: 0.5-0.65 of bf16's eps relative to the largest
    output measured, bounded at 2."""
    import copy

    from minilm import encoder as encoder_module
    from minilm.encoder import SHORT_BATCH, SelfAttention

    torch.manual_seed(0)
    config = BertConfig(vocab_size=100, hidden_size=64, num_hidden_layers=1, num_attention_heads=4,
                        intermediate_size=128)
    reference = SelfAttention(config).eval()
    fast = copy.deepcopy(reference).to(torch.bfloat16)
    seen, real = [], encoder_module.attention
    monkeypatch.setattr(encoder_module, "attention", lambda q, *args, **kwargs: seen.append(q.dtype) or real(
        q, *args, **kwargs))
    # q's dtype in attention for: the float32 reference, the bf16 layer in inference, the same under autograd
    for lengths, expected_dtypes in (([5, 18], [torch.float32, torch.float32, torch.bfloat16]),
                                     ([7, SHORT_BATCH], [torch.float32, torch.bfloat16, torch.bfloat16])):
        seen.clear()
        hidden = torch.randn(sum(lengths), 64)
        cu_seqlens = torch.tensor([0, lengths[0], sum(lengths)], dtype=torch.int32)
        with torch.no_grad():
            expected = reference(hidden, cu_seqlens, max(lengths), "math")
            inference = fast(hidden.bfloat16(), cu_seqlens, max(lengths), "sdpa")
        with torch.enable_grad():
            trained = fast(hidden.bfloat16(), cu_seqlens, max(lengths), "sdpa").detach()
        assert seen == expected_dtypes
        assert inference.dtype == trained.dtype == torch.bfloat16
        bound = 2 * torch.finfo(torch.bfloat16).eps * float(expected.abs().max())
        for got in (inference, trained):
            assert float((got.float() - expected).abs().max()) < bound


def test_similarity_refuses_shapes_it_cannot_compare(model):
    """A 3-d array once broadcast through the matrix product into a [2, 2, 2] result, and embeddings of two sizes
    raised torch's 'mat1 and mat2 shapes cannot be multiplied': each is now an InputError naming the argument."""
    embeddings = model.encode(["one", "two"])
    with pytest.raises(minilm.InputError, match=r"^similarity: a has shape \(2, 2, 384\); expected \[dim\] or"):
        model.similarity(np.stack([embeddings, embeddings]), embeddings)
    with pytest.raises(minilm.InputError, match="^similarity: a has 384 dimensions and b 64; expected the same"):
        model.similarity(embeddings, embeddings[:, :64])
    with pytest.raises(minilm.InputError, match="^similarity: b must be embeddings"):
        model.similarity(embeddings, ["one", "two"])
    assert model.similarity(embeddings[0], embeddings.tolist()).shape == (1, 2)  # 1-d and lists still welcome


def test_max_seq_length_takes_a_numpy_integer_as_load_does(model_dir, tmp_path):
    """load(max_seq_length=np.int64(16)) passed load's check, then the tokenizer refused it: 'max_seq_length must
    be an integer >= 2; got np.int64(16)'. A numpy integer is now taken, as truncate_dim takes it, and saved."""
    short = minilm.load(str(model_dir), device="cpu", max_seq_length=np.int64(16))
    assert short.max_seq_length == 16 and type(short.max_seq_length) is int
    short.max_seq_length = np.int32(20)
    short.save(tmp_path)
    assert minilm.load(str(tmp_path), device="cpu").max_seq_length == 20
