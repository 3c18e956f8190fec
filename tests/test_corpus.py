"""python -m minilm encode: streaming equals encode(), kill-and-resume and torchrun give the same bytes, int8/binary
outputs, and bad input or a mismatched DIR ends in one line with nothing lost."""

import json
import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import minilm
from minilm import corpus
from minilm.__main__ import main
from minilm.similarity_search import calibrate_int8, dequantize_int8, pack_binary, quantize_int8, unpack_binary

from conftest import MODEL_ID, REPO

WORDS = ("the a man woman dog cat runs eats sleeps quickly over under bright dark river city music théâtre "
         "naïve 東京 data model question answer protein cell").split()
FILES = ("embeddings.npy", "ids.txt", "offsets.npy", "manifest.json")


def make_tiny_model(path: Path, model_dir: Path, seed: int = 0) -> Path:
    """A random 2-layer, width-64 BERT with the real tokenizer, saved with minilm's own save."""
    from minilm.encoder import BertConfig, BertEncoder
    from minilm.model import SentenceEncoder
    from minilm.tokenizer import SentenceTokenizer

    torch.manual_seed(seed)
    config = BertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    model = SentenceEncoder(BertEncoder(config), SentenceTokenizer.from_dir(model_dir), normalize=True,
                            source_dir=model_dir)
    return model.save(path)


def make_texts(count: int, seed: int = 0) -> list:
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, size=int(rng.integers(1, 24)))) for _ in range(count)]


@pytest.fixture(autouse=True)
def one_thread():
    """The tiny model's ops are too small to split: a second thread only waits for a core on a busy machine
    (10x slower here). One thread, as each torchrun rank has."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_dir(model_dir, tmp_path_factory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "tiny-bert", model_dir)


@pytest.fixture(scope="session")
def tiny(tiny_dir):
    return minilm.load(str(tiny_dir), device="cpu")


@pytest.fixture(scope="session")
def texts_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("input") / "texts.txt"
    path.write_text("\n".join(make_texts(300)) + "\n", encoding="utf-8")
    return path


def run(model, input_path, out, **options):
    options = {"window": 50, "progress": False, "log": lambda message: None, "model_name": str(model.source_dir),
               **options}
    return corpus.encode_corpus(model, input_path, out, **options)


@pytest.fixture(scope="session")
def straight(tiny, texts_file, tmp_path_factory) -> Path:
    """The reference: one uninterrupted run."""
    out = tmp_path_factory.mktemp("straight") / "out"
    run(tiny, texts_file, out)
    return out


def assert_same_files(a: Path, b: Path) -> None:
    assert sorted(p.name for p in b.iterdir()) == sorted(FILES), sorted(p.name for p in b.iterdir())
    for name in FILES:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


def test_streaming_equals_encode_in_input_order(tiny, texts_file, straight):
    texts = texts_file.read_text(encoding="utf-8").splitlines()
    embeddings = np.load(straight / "embeddings.npy", mmap_mode="r")
    assert embeddings.shape == (300, 64) and embeddings.dtype == np.float32
    assert np.abs(embeddings - tiny.encode(texts)).max() <= 1e-6
    assert (straight / "ids.txt").read_text().split() == [str(line) for line in range(1, 301)]
    manifest = json.loads((straight / "manifest.json").read_text())
    assert manifest["state"] == "finished" and manifest["count"] == 300 and manifest["windows"] == 6
    # each row's text is read back from the input by its offset
    assert corpus.Corpus(straight).texts([0, 299, 123]) == [texts[0], texts[299], texts[123]]


def test_real_model_streaming_equals_encode(model, tmp_path):
    texts = make_texts(200, seed=1)
    (tmp_path / "texts.jsonl").write_text("".join(json.dumps({"id": f"doc-{i}", "body": text}) + "\n"
                                                  for i, text in enumerate(texts)))
    run(model, tmp_path / "texts.jsonl", tmp_path / "out", field="body", id_field="id", window=64)
    embeddings = np.load(tmp_path / "out" / "embeddings.npy")
    assert np.abs(embeddings - model.encode(texts)).max() <= 1e-6
    assert (tmp_path / "out" / "ids.txt").read_text().split() == [f"doc-{i}" for i in range(200)]


class Killed(BaseException):
    """Stands for kill -9 in-process: unwinds without running any of minilm's own error handling."""


@pytest.mark.parametrize("point", ["prepare", "rows:0", "rows:3", "flushed:2", "marked:4", "marked:5"])
def test_killed_anywhere_resumes_to_the_same_bytes(tiny, texts_file, straight, tmp_path, monkeypatch, point):
    def die():
        raise Killed

    monkeypatch.setattr(corpus, "_die", die)
    monkeypatch.setattr(corpus, "CRASH", point)
    with pytest.raises(Killed):
        run(tiny, texts_file, tmp_path / "out")
    assert json.loads((tmp_path / "out" / "manifest.json").read_text())["state"] != "finished"
    monkeypatch.setattr(corpus, "CRASH", "")
    encoded = []
    monkeypatch.setattr(tiny, "encode", lambda texts, **kw: encoded.append(len(texts)) or type(tiny).encode(
        tiny, texts, **kw))
    run(tiny, texts_file, tmp_path / "out")
    assert_same_files(straight, tmp_path / "out")
    windows_done_before = {"prepare": 0, "rows:0": 0, "rows:3": 3, "flushed:2": 2, "marked:4": 5, "marked:5": 6}
    assert len(encoded) == 6 - windows_done_before[point]  # resumed, not restarted


def test_kill_9_then_resume(tiny_dir, tiny, tmp_path):
    texts = make_texts(200, seed=2)
    (tmp_path / "texts.txt").write_text("\n".join(texts) + "\n")
    out = tmp_path / "out"
    command = [sys.executable, "-m", "minilm", "encode", str(tmp_path / "texts.txt"), "--out", str(out),
               "--model", str(tiny_dir), "--window", "10", "--no-progress", "--device", "cpu"]
    process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                               env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.time() + 120
    while not ((out / "done.bin").is_file() and np.fromfile(out / "done.bin", dtype=np.uint8).sum() >= 2):
        assert process.poll() is None and time.time() < deadline, process.stderr.read()[-2000:]
        time.sleep(0.005)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert json.loads((out / "manifest.json").read_text())["state"] == "encoding", "finished before the kill"
    run(tiny, tmp_path / "texts.txt", out, window=10)
    run(tiny, tmp_path / "texts.txt", tmp_path / "straight", window=10)
    assert_same_files(tmp_path / "straight", out)


def test_torchrun_two_ranks_resume_to_the_bytes_of_one_process(tiny_dir, tiny, texts_file, straight, tmp_path,
                                                               monkeypatch):
    """One launch covers both: a single process killed after 2 windows, finished by 2 gloo ranks."""
    monkeypatch.setattr(corpus, "_die", lambda: (_ for _ in ()).throw(Killed()))
    monkeypatch.setattr(corpus, "CRASH", "marked:1")
    out = tmp_path / "out"
    with pytest.raises(Killed):
        run(tiny, texts_file, out, model_name=str(tiny_dir))
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "minilm",
         "encode", str(texts_file), "--out", str(out), "--model", str(tiny_dir), "--window", "50",
         "--no-progress", "--device", "cpu"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    manifest = json.loads((out / "manifest.json").read_text())
    straight_manifest = json.loads((straight / "manifest.json").read_text())
    assert manifest["model"] == str(tiny_dir)
    manifest["model"] = straight_manifest["model"]  # the in-process reference names its model otherwise
    assert manifest == straight_manifest
    for name in ("embeddings.npy", "ids.txt", "offsets.npy"):
        assert (straight / name).read_bytes() == (out / name).read_bytes(), name


@pytest.mark.parametrize("dtype", ["float16", "int8", "binary"])
def test_stored_precisions(tiny, texts_file, straight, tmp_path, dtype):
    manifest = run(tiny, texts_file, tmp_path / "out", dtype=dtype, calibration_size=100)
    stored = np.load(tmp_path / "out" / "embeddings.npy")
    full = np.load(straight / "embeddings.npy")
    if dtype == "float16":
        assert stored.dtype == np.float16 and np.array_equal(stored, full.astype(np.float16))
    elif dtype == "int8":
        texts = texts_file.read_text(encoding="utf-8").splitlines()
        calibration = manifest["calibration"]
        assert calibration == calibrate_int8(tiny.encode(texts[:100])) and calibration["size"] == 100
        assert stored.dtype == np.int8 and np.array_equal(stored, quantize_int8(full, calibration))
    else:
        assert stored.shape == (300, 8) and np.array_equal(stored, np.packbits(full > 0, axis=1))


def test_int8_and_binary_round_trips():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((500, 48)).astype(np.float32)
    x[:, 7] = 0.25  # a constant dimension
    calibration = calibrate_int8(x)
    step = (np.asarray(calibration["max"]) - np.asarray(calibration["min"])) / 255
    decoded = dequantize_int8(quantize_int8(x, calibration), calibration)
    assert (np.abs(decoded - x) <= step / 2 + 1e-6).all()  # inside the range: within half a step
    assert step[7] * 255 > 1  # widened to the floor, not a zero-width range
    # Calibrated on one text, other texts still get distinct codes in every dimension (no collapse).
    one = calibrate_int8(x[:1])
    codes = quantize_int8(x[1:], one)
    assert all(len(np.unique(codes[:, d])) > 3 for d in range(48) if d != 7)
    assert (np.abs(dequantize_int8(quantize_int8(x[:1], one), one) - x[:1]) <= 0.02).all()
    bits = pack_binary(x)
    assert bits.shape == (500, 6) and bits.dtype == np.uint8
    assert np.array_equal(unpack_binary(bits, 48), np.where(x > 0, 1.0, -1.0))


# --- bad input and mismatched DIRs ------------------------------------------------------------------------------
def cli_error(capsys, argv) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and err.startswith("python -m minilm encode: error: "), err
    return err.strip()


def test_bad_input_ends_in_one_line(tiny_dir, tmp_path, capsys):
    base = ["encode", "--model", str(tiny_dir), "--no-progress", "--device", "cpu", "--out"]
    (tmp_path / "a.jsonl").write_text('{"text": "one", "id": 1}\n\n{"body": "two", "id": 2}\n')
    message = cli_error(capsys, base + [str(tmp_path / "o1"), str(tmp_path / "a.jsonl"), "--id-field", "id"])
    assert "a.jsonl line 3: no field 'text'" in message and "--field" in message
    (tmp_path / "b.tsv").write_text("id\tsentence\n1\thello\n")
    message = cli_error(capsys, base + [str(tmp_path / "o2"), str(tmp_path / "b.tsv"), "--column", "text"])
    assert "b.tsv line 1: no column 'text' (columns: id, sentence)" in message
    (tmp_path / "c.txt").write_bytes(b"fine\n\xff\xfe broken\n")
    message = cli_error(capsys, base + [str(tmp_path / "o3"), str(tmp_path / "c.txt")])
    assert "c.txt line 2: not UTF-8" in message
    message = cli_error(capsys, base + [str(tmp_path / "o3"), str(tmp_path / "c.txt"), "--max-seq-length", "9999"])
    assert "error: --max-seq-length 9999: max_seq_length=9999" in message
    (tmp_path / "s.jsonl").write_text('{"text": "fine"}\n{"text": "half a pair: \\ud800"}\n')
    message = cli_error(capsys, base + [str(tmp_path / "o3"), str(tmp_path / "s.jsonl")])
    assert "s.jsonl line 2: field 'text' holds '\\ud800'" in message and "surrogate" in message
    # A failed check leaves nothing behind (o1..o3 never existed), so the DIR is free for any other input.
    assert not any((tmp_path / name).exists() for name in ("o1", "o2", "o3"))
    (tmp_path / "o5").mkdir()
    cli_error(capsys, base + [str(tmp_path / "o5"), str(tmp_path / "c.txt")])
    assert (tmp_path / "o5").is_dir() and not list((tmp_path / "o5").iterdir())  # a DIR that existed stays
    assert "is a folder" in cli_error(capsys, base + [str(tmp_path / "o6"), str(tmp_path)])
    # Empty lines of a text file are kept as empty texts (row i stays line i + 1), and said so.
    (tmp_path / "d.txt").write_text("one\n\nthree\n")
    main(base + [str(tmp_path / "o4"), str(tmp_path / "d.txt")])
    assert "1 of 3 texts" in capsys.readouterr().out
    assert (tmp_path / "o4" / "ids.txt").read_text().split() == ["1", "2", "3"]
    # Repeated ids are kept (chunks of one document may share one) and said so, with their lines.
    (tmp_path / "e.jsonl").write_text("".join(f'{{"text": "t{i}", "id": "{name}"}}\n'
                                              for i, name in enumerate(["a", "b", "a", "c", "b", "a"])))
    main(base + [str(tmp_path / "o7"), str(tmp_path / "e.jsonl"), "--id-field", "id"])
    said = capsys.readouterr().out
    assert "id 'a' is on lines 1, 3, 6" in said and "1 more id(s) repeat" in said
    assert (tmp_path / "o7" / "ids.txt").read_text().split() == ["a", "b", "a", "c", "b", "a"]


def test_mismatched_or_foreign_dir_is_refused_and_kept(tiny_dir, tiny, texts_file, straight, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    base = ["encode", str(texts_file), "--model", str(tiny_dir), "--window", "50", "--no-progress",
            "--device", "cpu", "--out", str(out)]
    assert "holds files minilm did not write (notes.txt)" in cli_error(capsys, base)
    assert "holds files minilm did not write" in cli_error(capsys, base + ["--overwrite"])
    assert (out / "notes.txt").read_text() == "mine" and len(list(out.iterdir())) == 1

    other_model = make_tiny_model(tmp_path / "other", Path(tiny.source_dir), seed=1)
    message = cli_error(capsys, base[:2] + ["--model", str(other_model)] + base[4:-1] + [str(straight)])
    assert "other settings or input (model_fingerprint" in message
    message = cli_error(capsys, base[:-1] + [str(straight), "--dtype", "int8"])
    assert 'dtype "float32" -> "int8"' in message and "calibration_size" in message
    before = {name: (straight / name).read_bytes() for name in FILES}
    main(base[:-1] + [str(straight)])  # same settings, finished: reported, nothing done
    assert "is finished (300 texts" in capsys.readouterr().out
    assert before == {name: (straight / name).read_bytes() for name in FILES}


def test_a_window_that_cannot_be_written_loses_nothing(tiny, texts_file, straight, tmp_path, monkeypatch):
    """A write failing mid-run (here: past RLIMIT_FSIZE, as a full disk would) ends in one line; rerun finishes."""
    monkeypatch.setattr(corpus, "_die", lambda: (_ for _ in ()).throw(Killed()))
    monkeypatch.setattr(corpus, "CRASH", "marked:0")
    out = tmp_path / "out"
    with pytest.raises(Killed):
        run(tiny, texts_file, out)
    monkeypatch.setattr(corpus, "CRASH", "")
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (10000, hard))  # window 1 starts at byte 128 + 50 * 256
    try:
        with pytest.raises(corpus.CorpusError, match=r"cannot write .*File too large; nothing is lost: rerun"):
            run(tiny, texts_file, out)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, previous)
    assert np.fromfile(out / "done.bin", dtype=np.uint8).tolist() == [1, 0, 0, 0, 0, 0]
    run(tiny, texts_file, out)
    assert_same_files(straight, out)


def test_cli_similarity_forms_and_help(tiny_dir, capsys):
    """The bare form (run.sh and the README call it) and `similarity` print the same matrix."""
    main(["--model", str(tiny_dir), "--device", "cpu", "A man eats.", "Someone is eating."])
    bare = capsys.readouterr().out
    main(["similarity", "--model", str(tiny_dir), "--device", "cpu", "A man eats.", "Someone is eating."])
    assert capsys.readouterr().out == bare and "[1] Someone is eating." in bare and " 1.000 " in bare
    with pytest.raises(SystemExit):
        main(["--help"])
    help_text = capsys.readouterr().out
    assert all(command in help_text for command in ("similarity", "encode", "search"))


def test_a_bad_fast_path_name_in_the_environment_is_one_line(tiny_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("MINILM_ATTENTION", "bogus")
    (tmp_path / "t.txt").write_text("one\ntwo\n")
    message = cli_error(capsys, ["encode", str(tmp_path / "t.txt"), "--model", str(tiny_dir), "--out",
                                 str(tmp_path / "o"), "--no-progress", "--device", "cpu"])
    assert "unknown attention backend 'bogus' (from $MINILM_ATTENTION)" in message


# --- reading a DIR back from anywhere ---------------------------------------------------------------------------
def test_search_works_from_any_folder_and_old_relative_manifests_still_load(tiny_dir, tmp_path, capsys,
                                                                             monkeypatch):
    """encode stores a local --model folder by its absolute path (a hub id as typed), so search finds it from any
    folder; a manifest written before, naming the folder as typed, still works from the folder encode ran in."""
    (tmp_path / "docs.txt").write_text("a dog runs in the park\nthe stock market fell\n")
    monkeypatch.chdir(tiny_dir.parent)
    main(["encode", str(tmp_path / "docs.txt"), "--model", tiny_dir.name, "--out", str(tmp_path / "emb"),
          "--no-progress", "--device", "cpu"])
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    capsys.readouterr()
    main(["search", str(tmp_path / "emb"), "a dog runs in the park", "--top-k", "1", "--device", "cpu"])
    assert "1.0000  1  a dog runs in the park" in capsys.readouterr().out
    manifest = json.loads((tmp_path / "emb" / "manifest.json").read_text())
    assert manifest["model"] == str(tiny_dir.resolve())
    # An older manifest: the model as it was typed, relative to the folder encode ran in.
    manifest["model"] = f"./{tiny_dir.name}"
    (tmp_path / "emb" / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(SystemExit) as stop:
        main(["search", str(tmp_path / "emb"), "a dog", "--device", "cpu"])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and len(err.splitlines()) == 1, err
    assert f"manifest.json names the model ./{tiny_dir.name}: cannot find model" in err and "pass --model" in err
    monkeypatch.chdir(tiny_dir.parent)
    main(["search", str(tmp_path / "emb"), "a dog runs in the park", "--top-k", "1", "--device", "cpu"])
    assert "1.0000  1  a dog runs in the park" in capsys.readouterr().out
    assert corpus.manifest_model_name(MODEL_ID) == MODEL_ID  # a hub id (no such folder here) stays as it is


def test_texts_survive_touch_but_not_a_change_of_the_same_size(tiny, tmp_path, monkeypatch):
    """A new mtime alone (touch, a copy without timestamps) is checked against the stored sha256, hashed once;
    a change that keeps the size is caught by it."""
    texts = ["a dog runs in the park", "the stock market fell", "a cat sleeps on the sofa"]
    (tmp_path / "docs.txt").write_text("\n".join(texts) + "\n")
    run(tiny, tmp_path / "docs.txt", tmp_path / "emb")
    stat = (tmp_path / "docs.txt").stat()
    os.utime(tmp_path / "docs.txt", ns=(stat.st_atime_ns, stat.st_mtime_ns + 5_000_000_000))  # touch
    hashed = []
    monkeypatch.setattr(corpus, "file_sha256", lambda path: hashed.append(path) or corpus.hashlib.sha256(
        Path(path).read_bytes()).hexdigest())
    data = corpus.Corpus(tmp_path / "emb")
    assert data.texts([2, 0]) == [texts[2], texts[0]]
    assert data.texts([1]) == [texts[1]] and len(hashed) == 1  # hashed once, not per query
    (tmp_path / "docs.txt").write_text("\n".join(texts).replace("dog", "cow") + "\n")  # same size, other bytes
    assert (tmp_path / "docs.txt").stat().st_size == stat.st_size
    assert data.texts([0, 1]) == [None, None]
    (tmp_path / "docs.txt").write_text("\n".join(texts) + "\n")
    os.utime(tmp_path / "docs.txt", ns=(stat.st_atime_ns, stat.st_mtime_ns))  # as encoded: no hashing needed
    assert corpus.Corpus(tmp_path / "emb").texts([0]) == [texts[0]] and len(hashed) == 2


def test_int8_refuses_a_calibration_sample_below_the_floor(tmp_path, capsys):
    """--calibration-size below 100 with --dtype int8 is refused in one line before the model loads
    (no-such-model is no model); other dtypes do not calibrate, so the flag does not matter to them."""
    (tmp_path / "t.txt").write_text("one\ntwo\n")
    base = ["encode", str(tmp_path / "t.txt"), "--model", "./no-such-model", "--out", str(tmp_path / "o"),
            "--no-progress", "--device", "cpu"]
    for size in ("1", "99"):
        message = cli_error(capsys, base + ["--dtype", "int8", "--calibration-size", size])
        assert f"--calibration-size {size} is too few texts for int8" in message
        assert "use at least 100" in message and "clip" in message
    base += ["--calibration-size", "1"]
    assert "no-such-model" in cli_error(capsys, base + ["--dtype", "float32"])  # past the check, at the model
    assert not (tmp_path / "o").exists()
    with pytest.raises(corpus.CorpusError, match="too few texts for int8"):  # the Python API refuses it too
        corpus.encode_corpus(None, tmp_path / "t.txt", tmp_path / "o", model_name="m", dtype="int8",
                             calibration_size=1)
