"""python -m minilm encode: streaming equals encode(), kill-and-resume and torchrun give the same bytes, int8/binary
outputs, bad input or a mismatched DIR ends in one line with nothing lost, and a DIR is input: damaged or
crafted in any file or field it is refused in one line, locked while encode writes, never written through a
symbolic link."""

import json
import math
import os
import shutil
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
from minilm import corpus, corpus_folder
from minilm.corpus_folder import CorpusError
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


@pytest.mark.parametrize("storage", ["float16", "int8", "binary"])
def test_stored_formats(tiny, texts_file, straight, tmp_path, storage):
    manifest = run(tiny, texts_file, tmp_path / "out", storage=storage, calibration_size=100)
    stored = np.load(tmp_path / "out" / "embeddings.npy")
    full = np.load(straight / "embeddings.npy")
    if storage == "float16":
        assert stored.dtype == np.float16 and np.array_equal(stored, full.astype(np.float16))
    elif storage == "int8":
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
    assert len(err.splitlines()) == 1 and err.startswith(f"python -m minilm {argv[0]}: error: "), err
    return err.strip()


def test_bad_input_ends_in_one_line(tiny_dir, tmp_path, capsys):
    base = ["encode", "--model", str(tiny_dir), "--no-progress", "--device", "cpu", "--out"]
    (tmp_path / "a.jsonl").write_text('{"text": "one", "id": 1}\n\n{"body": "two", "id": 2}\n')
    message = cli_error(capsys, base + [str(tmp_path / "o1"), str(tmp_path / "a.jsonl"), "--id-field", "id"])
    assert "a.jsonl line 3: no field 'text'" in message and "--field" in message
    (tmp_path / "b.tsv").write_text("id\tsentence\n1\thello\n")
    message = cli_error(capsys, base + [str(tmp_path / "o2"), str(tmp_path / "b.tsv"), "--column", "text"])
    assert "b.tsv line 1: no column 'text' (columns: id, sentence)" in message
    (tmp_path / "b2.csv").write_text("id,text,text\n1,first,second\n")  # was read from the first, silently
    message = cli_error(capsys, base + [str(tmp_path / "o2"), str(tmp_path / "b2.csv")])
    assert "b2.csv line 1: the header names 'text' twice (--column); keep one" in message
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
    message = cli_error(capsys, base[:-1] + [str(straight), "--storage", "int8"])
    assert 'storage "float32" -> "int8"' in message and "calibration_size" in message
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


def test_search_encodes_its_queries_in_another_precision_when_asked(tiny_dir, tmp_path, capsys):
    """search encodes queries in DIR's precision unless --precision names another (a DIR encoded in bf16 on a CPU
    with AMX, searched where bf16 is slow): the hits are the same, the scores within bf16's rounding."""
    texts = ["a dog runs in the park", "the stock market fell", "rain is expected tomorrow"]
    (tmp_path / "docs.txt").write_text("\n".join(texts) + "\n")
    main(["encode", str(tmp_path / "docs.txt"), "--model", str(tiny_dir), "--out", str(tmp_path / "emb"),
          "--no-progress", "--device", "cpu", "--precision", "bf16"])
    for precision in ([], ["--precision", "fp32"]):
        capsys.readouterr()
        main(["search", str(tmp_path / "emb"), texts[1], "--top-k", "1", "--device", "cpu", *precision])
        rank, score, record_id = capsys.readouterr().out.split("\n")[2].split()[:3]
        assert (rank, record_id) == ("1.", "2")
        assert abs(float(score) - 1) < 4 * torch.finfo(torch.bfloat16).eps  # bf16 rows against either query


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
    """--calibration-size below 100 with --storage int8 is refused in one line before the model loads
    (no-such-model is no model); other storages do not calibrate, so the flag does not matter to them."""
    (tmp_path / "t.txt").write_text("one\ntwo\n")
    base = ["encode", str(tmp_path / "t.txt"), "--model", "./no-such-model", "--out", str(tmp_path / "o"),
            "--no-progress", "--device", "cpu"]
    for size in ("1", "99"):
        message = cli_error(capsys, base + ["--storage", "int8", "--calibration-size", size])
        assert f"--calibration-size {size} is too few texts for int8" in message
        assert "use at least 100" in message and "clip" in message
    base += ["--calibration-size", "1"]
    assert "no-such-model" in cli_error(capsys, base + ["--storage", "float32"])  # past the check, at the model
    assert not (tmp_path / "o").exists()
    with pytest.raises(corpus.CorpusError, match="too few texts for int8"):  # the Python API refuses it too
        corpus.encode_corpus(None, tmp_path / "t.txt", tmp_path / "o", model_name="m", storage="int8",
                             calibration_size=1)


# --- a DIR is input -----------------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def int8_dir(tiny, tmp_path_factory) -> Path:
    """A finished int8 DIR of 20 JSONL texts with ids (calibrated on all 20): copied by the tests that damage it."""
    folder = tmp_path_factory.mktemp("int8")
    (folder / "docs.jsonl").write_text("".join(json.dumps({"id": f"d{i}", "text": text}) + "\n"
                                               for i, text in enumerate(make_texts(20, seed=3))) + "\n\n")
    run(tiny, folder / "docs.jsonl", folder / "out", id_field="id", storage="int8", calibration_size=100)
    return folder / "out"


def edit(field: str, value):
    """A damage: set the manifest's field (a dotted path) to value; value None removes it."""
    def damage(out: Path):
        manifest = json.loads((out / "manifest.json").read_text())
        *parents, name = field.split(".")
        target = manifest
        for parent in parents:
            target = target[parent]
        target.pop(name) if value is None else target.__setitem__(name, value(target[name]) if callable(value)
                                                                  else value)
        (out / "manifest.json").write_text(json.dumps(manifest))
    return damage


def resave(name: str, change):
    return lambda out: np.save(out / name, change(np.load(out / name)))


def rewrite(name: str, change):
    return lambda out: (out / name).write_bytes(change((out / name).read_bytes()))


def link_elsewhere(out: Path):
    shutil.copy(out / "embeddings.npy", out.parent / "elsewhere.npy")
    (out / "embeddings.npy").unlink()
    (out / "embeddings.npy").symlink_to(out.parent / "elsewhere.npy")


DIR_CASES = [  # (name, damage to a finished int8 DIR of 20 rows of 64 dims, fragments of the one-line error)
    ("embeddings-fewer-rows", resave("embeddings.npy", lambda a: a[:5]), ["embeddings.npy", "int8 [5, 64]",
                                                                          "the manifest says int8 [20, 64]"]),
    ("embeddings-other-dtype", resave("embeddings.npy", lambda a: a.astype(np.float32)), ["embeddings.npy",
                                                                                           "float32 [20, 64]"]),
    ("embeddings-transposed", resave("embeddings.npy", lambda a: np.asfortranarray(a)), ["embeddings.npy"]),
    ("embeddings-cut-short", rewrite("embeddings.npy", lambda b: b[:-100]), ["embeddings.npy"]),
    ("embeddings-longer", rewrite("embeddings.npy", lambda b: b + bytes(64)), ["embeddings.npy", "its header says"]),
    ("embeddings-not-npy", rewrite("embeddings.npy", lambda b: b"not numpy"), ["embeddings.npy", "not a .npy"]),
    ("embeddings-a-link", link_elsewhere, ["embeddings.npy", "symbolic link"]),
    ("embeddings-missing", lambda out: (out / "embeddings.npy").unlink(), ["embeddings.npy", "missing"]),
    ("offsets-short", resave("offsets.npy", lambda a: a[:-1]), ["offsets.npy", "[19]", "[20]"]),
    ("offsets-as-int32", resave("offsets.npy", lambda a: a.astype(np.int32)), ["offsets.npy", "int32"]),
    ("offsets-not-increasing", resave("offsets.npy", lambda a: a[::-1].copy()), ["offsets.npy", "not increasing"]),
    ("offsets-outside-input", resave("offsets.npy", lambda a: a + 10**6), ["offsets.npy", "inside INPUT"]),
    ("ids-short", rewrite("ids.txt", lambda b: b[:b.rindex(b"d19")]), ["ids.txt", "19 lines", "count is 20"]),
    ("ids-long", rewrite("ids.txt", lambda b: b + b"d20\n"), ["ids.txt", "21 lines"]),
    ("ids-missing", lambda out: (out / "ids.txt").unlink(), ["ids.txt", "missing"]),
    ("manifest-not-json", rewrite("manifest.json", lambda b: b[:-20]), ["manifest.json", "unreadable"]),
    ("manifest-a-list", rewrite("manifest.json", lambda b: b"[1, 2]"), ["not a minilm corpus manifest"]),
    ("state", edit("state", "done"), ["'state' is \"done\"", "preparing or encoding or finished"]),
    ("count-a-word", edit("count", "20"), ["'count' is \"20\"", "whole number"]),
    ("count-zero", edit("count", 0), ["'count' is 0"]),
    ("count-larger", edit("count", 40), ["'shape' is [20, 64]", "[40, 64]"]),
    ("dim-smaller", edit("dim", 32), ["'shape' is [20, 64]", "[20, 32]"]),
    ("shape", edit("shape", [5, 64]), ["'shape' is [5, 64]"]),
    ("storage-unknown", edit("settings.storage", "int4"), ["'settings.storage' is \"int4\"", "binary"]),
    ("storage-disagrees", edit("storage", "float32"), ["'storage' is \"float32\"", "settings.storage (int8)"]),
    ("windows", edit("windows", 7), ["'windows' is 7", "= 1"]),
    ("window-zero", edit("settings.window", 0), ["'settings.window' is 0"]),
    ("max-seq-length", edit("settings.max_seq_length", "long"), ["'settings.max_seq_length'"]),
    ("fingerprint", edit("settings.model_fingerprint", None), ["'settings.model_fingerprint' is null"]),
    ("settings-missing", edit("settings", None), ["'settings' is null"]),
    ("input-missing", edit("input", None), ["'input' is null"]),
    ("input-path", edit("input.path", 3), ["'input.path' is 3"]),
    ("input-size", edit("input.size", -1), ["'input.size' is -1"]),
    ("input-sha256", edit("input.sha256", "abc"), ["'input.sha256'"]),
    ("model", edit("model", 5), ["'model' is 5"]),
    ("precision", edit("precision", "fp64"), ["'precision' is \"fp64\""]),
    ("precision-auto", edit("settings.precision", "auto"), ["'settings.precision' is \"auto\"", "fp32 | bf16"]),
    ("normalize", edit("normalize", "yes"), ["'normalize' is \"yes\""]),
    ("empty-texts", edit("empty_texts", 99), ["'empty_texts' is 99"]),
    ("truncate-dim-a-word", edit("settings.truncate_dim", "64"), ["'settings.truncate_dim' is \"64\"",
                                                                  "null or a whole number"]),
    ("truncate-dim-not-dim", edit("settings.truncate_dim", 32), ["'dim' is 64", "settings.truncate_dim (32)"]),
    ("prompt-a-number", edit("settings.prompt", 5), ["'settings.prompt' is 5", "a string"]),
    ("calibration-missing", edit("calibration", None), ["'calibration' is null", "an object"]),
    ("calibration-short", edit("calibration.min", lambda v: v[:-1]), ["'calibration.min'", "64 numbers"]),
    ("calibration-inverted", edit("calibration.max", lambda v: [-x for x in v]), ["'calibration.max[0]'"]),
    ("calibration-nan", edit("calibration.min", lambda v: v[:3] + [math.nan] + v[4:]), ["'calibration.max[3]'"]),
    ("calibration-size", edit("calibration.size", "all"), ["'calibration.size' is \"all\""]),
    ("ids-not-utf8", rewrite("ids.txt", lambda b: b.replace(b"d3\n", b"\xff3\n")), ["ids.txt line 4", "not UTF-8"]),
    ("offset-at-a-blank-line", lambda out: resave("offsets.npy", lambda a: np.append(a[:-1], json.loads(
        (out / "manifest.json").read_text())["input"]["size"] - 1))(out), ["offsets.npy row 19", "no record"]),
]


@pytest.mark.parametrize("case", DIR_CASES, ids=[case[0] for case in DIR_CASES])
def test_a_damaged_dir_is_refused_in_one_line_naming_file_and_field(case, int8_dir, tiny_dir, tmp_path, capsys):
    """search (and encode, run again on it) read DIR's files only after checking them against the manifest:
    one line naming the file and the field, nothing changed (today a smaller embeddings.npy is searched as is,
    and damaged fields end in tracebacks)."""
    _, damage, fragments = case
    out = tmp_path / "out"
    shutil.copytree(int8_dir, out, symlinks=True)
    damage(out)
    before = {path: path.read_bytes() for path in tmp_path.rglob("*") if path.is_file()}
    message = cli_error(capsys, ["search", str(out), "a query", "--top-k", "20", "--model", str(tiny_dir),
                                 "--device", "cpu"])
    for fragment in fragments:
        assert fragment in message, (fragment, message)
    if "line" not in message and "row" not in message:  # found before any row is read: encode finds it too
        source = json.loads((int8_dir / "manifest.json").read_text())["input"]["path"]
        message = cli_error(capsys, ["encode", source, "--out", str(out), "--model", str(tiny_dir), "--id-field",
                                     "id", "--storage", "int8", "--calibration-size", "100", "--window", "50",
                                     "--no-progress", "--device", "cpu"])
        assert all(fragment in message for fragment in fragments), message
    assert before == {path: path.read_bytes() for path in tmp_path.rglob("*") if path.is_file()}


def killed_after_window_0(tiny, texts_file, out, monkeypatch) -> None:
    """A run killed once window 0 is on disk and marked (state: encoding)."""
    with monkeypatch.context() as patch:
        patch.setattr(corpus, "_die", lambda: (_ for _ in ()).throw(Killed()))
        patch.setattr(corpus, "CRASH", "marked:0")
        with pytest.raises(Killed):
            run(tiny, texts_file, out)


def test_resume_never_writes_through_a_symlinked_file(tiny, texts_file, tmp_path, monkeypatch):
    """A killed run whose embeddings.npy (or done.bin) became a link to a file elsewhere: the resumed run refuses
    it in one line and that file keeps its bytes (today the rows are written into it)."""
    out = tmp_path / "out"
    killed_after_window_0(tiny, texts_file, out, monkeypatch)
    for name in ("embeddings.npy", "done.bin"):
        elsewhere = tmp_path / f"elsewhere-{name}"
        shutil.move(out / name, elsewhere)
        (out / name).symlink_to(elsewhere)
        kept = elsewhere.read_bytes()
        with pytest.raises(corpus.CorpusError, match=f"{out / name} is a symbolic link"):
            run(tiny, texts_file, out)
        assert elsewhere.read_bytes() == kept
        (out / name).unlink()
        shutil.move(elsewhere, out / name)


@pytest.mark.parametrize("damage", [b"\x01\x00", b"\x01\x02\x00\x00\x00\x00"])
def test_a_damaged_done_bin_is_refused_before_resuming(tiny, texts_file, tmp_path, monkeypatch, damage):
    """done.bin decides which windows are encoded again: one of another size, or a byte other than 0 or 1 (which
    would count as done and leave a hole), is refused in one line naming it."""
    out = tmp_path / "out"
    killed_after_window_0(tiny, texts_file, out, monkeypatch)
    (out / "done.bin").write_bytes(damage)
    embeddings = (out / "embeddings.npy").read_bytes()
    with pytest.raises(corpus.CorpusError, match=r"done.bin: .*windows is 6 \(one byte per window, 0 or 1\)"):
        run(tiny, texts_file, out)
    assert (out / "embeddings.npy").read_bytes() == embeddings


def test_a_dir_in_use_is_refused_and_left_alone(tiny, tiny_dir, texts_file, straight, tmp_path, monkeypatch, capsys):
    """While one encode holds DIR (its lock, as train.py's), a second, resuming or --overwrite, is refused in one
    line before it touches anything; once the lock is free the run resumes to the bytes of an uninterrupted run
    and the finished DIR holds no lock file (nor the temporary file of a killed manifest write)."""
    out = tmp_path / "out"
    killed_after_window_0(tiny, texts_file, out, monkeypatch)
    before = {path.name: path.read_bytes() for path in out.iterdir()}
    command = ["encode", str(texts_file), "--out", str(out), "--model", str(tiny_dir), "--window", "50",
               "--no-progress", "--device", "cpu"]
    with corpus_folder.lock(out):
        for extra in ([], ["--overwrite"]):
            message = cli_error(capsys, command + extra)
            assert f"--out {out}: another process (pid {os.getpid()}) is encoding into it" in message
    assert {path.name: path.read_bytes() for path in out.iterdir() if path.name != "minilm.lock"} == \
        {name: data for name, data in before.items() if name != "minilm.lock"}
    (out / ".manifest.json.12345-0.partial").write_text("{")  # what a kill while the manifest was written leaves
    run(tiny, texts_file, out)
    assert_same_files(straight, out)  # that temporary file removed too


def test_a_dir_written_before_storage_was_named_still_reads_and_resumes(tiny, tiny_dir, texts_file, straight,
                                                                        tmp_path, monkeypatch, capsys):
    """Manifests written before --storage say "dtype" (at the top and in settings), and have no settings.truncate_dim
    or settings.prompt (written before encode had them): search reads a finished one, and a killed one resumes to
    the same bytes, its manifest then saying "storage", truncate_dim null and prompt ""."""
    def as_before(out: Path):
        manifest = json.loads((out / "manifest.json").read_text())
        for fields in (manifest, manifest["settings"]):
            fields["dtype"] = fields.pop("storage")
        assert manifest["settings"].pop("truncate_dim") is None and manifest["settings"].pop("prompt") == ""
        (out / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")

    out = tmp_path / "out"
    killed_after_window_0(tiny, texts_file, out, monkeypatch)
    as_before(out)
    run(tiny, texts_file, out)
    for name in ("embeddings.npy", "ids.txt", "offsets.npy"):
        assert (straight / name).read_bytes() == (out / name).read_bytes(), name
    assert json.loads((out / "manifest.json").read_text()) == json.loads((straight / "manifest.json").read_text())
    as_before(out)
    main(["search", str(out), "a query", "--top-k", "2", "--device", "cpu", "--model", str(tiny_dir)])
    assert capsys.readouterr().out.count("\n   ") == 2  # two hits
    assert corpus.Corpus(out).manifest["storage"] == "float32"


def test_dtype_is_refused_naming_storage(tmp_path, capsys):
    """--storage is what embeddings.npy keeps, --precision how encode computes: the old --dtype is one line that
    says so, before any model loads (no-such-model is no model)."""
    (tmp_path / "t.txt").write_text("one\n")
    base = ["encode", str(tmp_path / "t.txt"), "--model", "./no-such-model", "--out", str(tmp_path / "o")]
    message = cli_error(capsys, base + ["--dtype", "int8"])
    assert "--dtype int8: the stored format is --storage now (--storage int8)" in message and "--precision" in message
    assert "--storage float32|float16|int8|binary" in cli_error(capsys, base + ["--dtype", "fp16"])
    assert not (tmp_path / "o").exists()


def test_truncate_dim_and_prompt_are_recorded_and_searched(tiny_dir, tmp_path, capsys):
    """encode --truncate-dim N --prompt...: rows are the model's encode_document embeddings cut to N (unit length
    again), the manifest says N and the prompt's text; search encodes its queries with the model's query prompt
    (or --query-prompt) cut to N; another N on resume, a query of another size, bad flags: one line each."""
    model = minilm.load(str(tiny_dir), device="cpu")
    model.prompts = {"query": "find: ", "document": "doc: ", "other": "o: "}
    model_dir = model.save(tmp_path / "prompted")
    texts = make_texts(30, seed=5)
    (tmp_path / "t.txt").write_text("\n".join(texts) + "\n", encoding="utf-8")
    base = ["encode", str(tmp_path / "t.txt"), "--model", str(model_dir), "--no-progress", "--device", "cpu",
            "--window", "8"]
    main(base + ["--out", str(tmp_path / "cut"), "--truncate-dim", "16"])
    manifest = json.loads((tmp_path / "cut" / "manifest.json").read_text())
    assert manifest["settings"]["truncate_dim"] == 16 and manifest["settings"]["prompt"] == "doc: "
    assert manifest["dim"] == 16 and manifest["shape"] == [30, 16]
    rows = np.load(tmp_path / "cut" / "embeddings.npy")
    expected = model.encode_document(texts, truncate_dim=16, normalize=True)
    assert np.abs(rows - expected).max() <= 1e-6 and np.abs(rows - model.encode(texts)[:, :16]).max() > 1e-3
    main(base + ["--out", str(tmp_path / "named"), "--prompt-name", "other", "--storage", "binary",
                 "--truncate-dim", "12"])
    named = corpus.Corpus(tmp_path / "named")
    assert named.manifest["settings"]["prompt"] == "o: " and named.manifest["shape"] == [30, 2]
    capsys.readouterr()

    main(["search", str(tmp_path / "cut"), texts[3], "--top-k", "1"])
    query = model.encode_query(texts[3], truncate_dim=16, normalize=True)  # "find: " before it, cut, unit length
    top = capsys.readouterr().out.strip().splitlines()[1].split()
    assert top[1] == f"{float((rows @ query).max()):.4f}" and float(rows[3] @ query) < 0.9999
    main(["search", str(tmp_path / "cut"), texts[3], "--top-k", "1", "--query-prompt", "doc: "])
    assert capsys.readouterr().out.strip().splitlines()[1].split()[1:3] == ["1.0000", "4"]  # the text itself

    with pytest.raises(CorpusError, match=r"queries of 16 dimensions; .*named holds 12-d embeddings \(encoded with "
                                          r"truncate_dim 12: encode the queries with it too\)"):
        named.search(np.ones(16, dtype=np.float32))  # 2 bytes of bits either way: only the manifest can tell
    assert cli_error(capsys, base + ["--out", str(tmp_path / "cut"), "--truncate-dim", "8"]).count(
        "truncate_dim 16 -> 8") == 1
    for flags, message in ((["--truncate-dim", "65"], "--truncate-dim 65: truncate_dim must be a whole number from "
                                                      "1 to 64"),
                           (["--prompt-name", "passage"], "--prompt-name 'passage': prompt_name 'passage' is not "
                                                          "one of the model's prompts ('query', 'document', 'other')"),
                           (["--prompt-name", ""], "--prompt-name '': prompt_name '' is not one")):
        assert message in cli_error(capsys, base + ["--out", str(tmp_path / "never"), *flags])
    assert not (tmp_path / "never").exists()


def test_precision_auto_records_the_precision_that_ran(tiny_dir, tmp_path, capsys):
    """encode --precision auto: decided once, before anything is written; the manifest records what ran (a DIR
    whose manifest says "auto" is refused: see DIR_CASES), the rows are that precision's, and a resume with auto
    finds the same settings."""
    from minilm import fast_paths

    model = minilm.load(str(tiny_dir), device="cpu")
    texts = make_texts(20, seed=7)
    (tmp_path / "t.txt").write_text("\n".join(texts) + "\n", encoding="utf-8")
    argv = ["encode", str(tmp_path / "t.txt"), "--model", str(tiny_dir), "--no-progress", "--device", "cpu",
            "--window", "8", "--out", str(tmp_path / "auto"), "--precision", "auto"]
    main(argv)
    chosen = fast_paths.auto_precision("cpu").precision
    manifest = json.loads((tmp_path / "auto" / "manifest.json").read_text())
    assert manifest["precision"] == manifest["settings"]["precision"] == chosen
    assert f"encoded in {chosen}" in capsys.readouterr().out
    windows = [model.encode(texts[start:start + 8], precision=chosen) for start in range(0, len(texts), 8)]
    np.testing.assert_array_equal(np.load(tmp_path / "auto" / "embeddings.npy"), np.concatenate(windows))
    main(argv)  # finished, same settings: nothing to do (another precision would be refused)
    assert "is finished" in capsys.readouterr().out


def test_a_dir_begun_where_auto_picked_another_precision_names_the_flag_that_continues_it(tiny_dir, tmp_path, capsys,
                                                                                          monkeypatch):
    """The same command with --precision auto on another CPU (auto: int8 where the DIR began, fp32 here; faked) is
    refused, as any change of precision is, and the one line says which --precision continues the DIR."""
    from minilm import cpu, fast_paths

    (tmp_path / "t.txt").write_text("\n".join(make_texts(6, seed=3)) + "\n", encoding="utf-8")
    argv = ["encode", str(tmp_path / "t.txt"), "--model", str(tiny_dir), "--no-progress", "--device", "cpu",
            "--out", str(tmp_path / "dir"), "--precision", "auto"]

    def auto_picks(precision):
        monkeypatch.setattr(fast_paths, "auto_precision", lambda device_type: cpu.Choice(precision, "faked"))

    auto_picks("int8")  # the machine the DIR began on
    main(argv)
    assert "encoded in int8" in capsys.readouterr().out
    auto_picks("fp32")  # this one
    message = cli_error(capsys, argv)
    assert 'precision "int8" -> "fp32"; --precision int8 continues it' in message
    main(argv[:-1] + ["int8"])
    assert "is finished" in capsys.readouterr().out


def test_ids_and_texts_refuse_rows_outside_the_corpus(straight, texts_file):
    """Row -1 read the last text but was a KeyError for ids, row 300 of 300 a bare KeyError or numpy IndexError,
    and row 1.5 was cut to 1: each is now an IndexError naming the row and the rows there are."""
    data = corpus.Corpus(straight)
    texts = texts_file.read_text().splitlines()
    assert data.texts(torch.tensor([299, 0])) == [texts[299], texts[0]] and data.ids(np.array([299])) == ["300"]
    for rows in ([300], [-1], [1.5], [True], [[1, 2]]):
        for read in (data.ids, data.texts):
            with pytest.raises(IndexError, match=r"row .*: .* holds rows 0 to 299 \(a list of whole numbers\)"):
                read(rows)


def test_a_finished_dir_with_a_users_file_beside_it_still_reads(tiny, tiny_dir, texts_file, straight, tmp_path,
                                                                 capsys):
    """A README.md or a .ipynb_checkpoints folder (Jupyter makes one) put in a finished DIR made search refuse it
    as one "--out" holding files minilm did not write; a read passes them by. encode, which writes there, still
    refuses."""
    out = tmp_path / "out"
    shutil.copytree(straight, out)
    (out / "README.md").write_text("my corpus")
    (out / ".ipynb_checkpoints").mkdir()
    data = corpus.Corpus(out)
    assert data.ids([0]) == ["1"] and data.texts([0]) == texts_file.read_text().splitlines()[:1]
    main(["search", str(out), "a query", "--top-k", "1", "--device", "cpu"])
    assert "   1. " in capsys.readouterr().out
    message = cli_error(capsys, ["encode", str(texts_file), "--model", str(tiny_dir), "--window", "50",
                                 "--no-progress", "--device", "cpu", "--out", str(out)])
    assert "holds files minilm did not write (.ipynb_checkpoints, README.md)" in message
