"""minilm.search equals brute force on float, int8 and binary corpora, in small chunks; python -m minilm search."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import minilm
from minilm.__main__ import main
from minilm.similarity_search import calibrate_int8, dequantize_int8, pack_binary, quantize_int8, unpack_binary

from conftest import REPO, child_env
from test_corpus import one_thread, run, tiny, tiny_dir  # noqa: F401 (fixtures)


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    corpus = rng.standard_normal((700, 40)).astype(np.float32)
    queries = rng.standard_normal((9, 40)).astype(np.float32)
    return queries, corpus


def brute_force(queries, corpus, similarity="cos"):
    """The full score matrix [num_queries, corpus_size]."""
    q, c = torch.from_numpy(queries), torch.from_numpy(corpus)
    if similarity == "cos":
        q, c = F.normalize(q, dim=-1), F.normalize(c, dim=-1)
    return q @ c.T


def assert_same_ranking(got, all_scores, k, atol=1e-5):
    """The k best scores, and each returned row really has its score (ties may come in any order)."""
    indices, scores = got
    assert torch.allclose(scores, all_scores.topk(k, dim=1).values, atol=atol)
    assert torch.allclose(all_scores.gather(1, indices), scores, atol=atol)
    assert all(len(set(row)) == k for row in indices.tolist())


@pytest.mark.parametrize("similarity", ["cos", "dot"])
def test_float_equals_brute_force(data, similarity):
    queries, corpus = data
    got = minilm.search(queries, corpus, top_k=7, similarity=similarity, query_chunk=4, corpus_chunk=64)
    assert_same_ranking(got, brute_force(queries, corpus, similarity), 7)
    indices, _ = minilm.search(queries, corpus[:3], top_k=10)
    assert indices.shape == (9, 3)  # k = min(top_k, corpus size)


def test_int8_equals_brute_force_on_the_decoded_vectors(data):
    queries, corpus = data
    calibration = calibrate_int8(corpus[:100])
    codes = quantize_int8(corpus, calibration)
    got = minilm.search(queries, codes, top_k=7, query_chunk=4, corpus_chunk=64, calibration=calibration)
    assert_same_ranking(got, brute_force(queries, dequantize_int8(codes, calibration)), 7)
    # and it keeps most of the float ranking
    float_top = brute_force(queries, corpus).topk(7, dim=1).indices
    overlap = (got[0][:, :, None] == float_top[:, None, :]).any(-1).float().mean()
    assert overlap > 0.8
    with pytest.raises(ValueError, match="needs its calibration"):
        minilm.search(queries, codes)


def test_binary_hamming_and_rescoring_equal_brute_force(data):
    queries, corpus = data
    bits = pack_binary(corpus)
    signs = unpack_binary(bits, 40)
    # Hamming: score 1 - 2 hamming / dim = cosine of the +-1 vectors
    got = minilm.search(queries, bits, top_k=7, query_chunk=4, corpus_chunk=64)
    assert_same_ranking(got, brute_force(np.where(queries > 0, 1.0, -1.0).astype(np.float32), signs), 7)
    hamming = (np.unpackbits(pack_binary(queries)[:, None] ^ bits[None], axis=2, count=40)).sum(-1)  # [q, n]
    assert np.allclose(got[1].numpy(), 1 - 2 * np.sort(hamming, axis=1)[:, :7] / 40)
    # Rescoring every row is brute force of the float query against the +-1 vectors.
    got = minilm.search(queries, bits, top_k=7, corpus_chunk=64, rescore=100)
    assert_same_ranking(got, brute_force(queries, signs), 7)
    # Rescoring few candidates: the best of the Hamming top 4 * 7, reordered by the float query.
    hamming_top, _ = minilm.search(queries, bits, top_k=28, corpus_chunk=64)
    got = minilm.search(queries, bits, top_k=7, corpus_chunk=64, rescore=4)
    assert all(set(row) <= set(candidates) for row, candidates in zip(got[0].tolist(), hamming_top.tolist()))
    with pytest.raises(ValueError, match="rescore is for binary"):
        minilm.search(queries, corpus, rescore=4)
    with pytest.raises(ValueError, match="uint8 columns"):
        minilm.search(queries, bits[:, :3])


def test_search_reads_a_memory_mapped_corpus(data, tmp_path):
    queries, corpus = data
    np.save(tmp_path / "e.npy", pack_binary(corpus))
    mapped = np.load(tmp_path / "e.npy", mmap_mode="r")
    assert torch.equal(minilm.search(queries, mapped, top_k=5, rescore=3)[0],
                       minilm.search(queries, pack_binary(corpus), top_k=5, rescore=3)[0])


@pytest.mark.parametrize("storage", ["float32", "binary"])
def test_cli_search_prints_ids_and_texts(tiny, tiny_dir, tmp_path, capsys, storage):  # noqa: F811
    texts = ["a dog runs in the park", "the stock market fell", "a cat sleeps on the sofa", "rain over the city"]
    (tmp_path / "docs.jsonl").write_text("".join(f'{{"_id": "d{i}", "text": "{t}"}}\n' for i, t in enumerate(texts)))
    run(tiny, tmp_path / "docs.jsonl", tmp_path / "out", id_field="_id", storage=storage)
    main(["search", str(tmp_path / "out"), "a dog runs in the park", "--top-k", "2", "--device", "cpu"]
         + (["--rescore", "2"] if storage == "binary" else []))
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0] == "query: a dog runs in the park"
    expected = minilm.search(tiny.encode(["a dog runs in the park"]),
                             np.load(tmp_path / "out" / "embeddings.npy"), top_k=2,
                             rescore=2 if storage == "binary" else None)[0][0].tolist()
    for line, row in zip(lines[1:], expected):
        assert line.split()[2:] == [f"d{row}", *texts[row].split()], lines
    if storage == "float32":
        assert lines[1].split()[1] == "1.0000"  # the query is the first text
    else:  # a bad --rescore or a DIR that is not there: one line, exit 2
        for argv, message in ((["--rescore", "0"], "--rescore must be at least 1, not 0"),
                              (["--top-k", "0"], "--top-k must be at least 1")):
            with pytest.raises(SystemExit) as stop:
                main(["search", str(tmp_path / "out"), "a dog", "--device", "cpu", *argv])
            assert stop.value.code == 2 and message in capsys.readouterr().err
        with pytest.raises(SystemExit):
            main(["search", str(tmp_path / "nowhere"), "a dog"])
        assert "nowhere: no such folder" in capsys.readouterr().err
        (tmp_path / "corpus.txt").write_text("a dog\n")  # the INPUT given for DIR: there, but not a folder
        with pytest.raises(SystemExit):
            main(["search", str(tmp_path / "corpus.txt"), "a dog"])
        assert "corpus.txt: is a file, not the folder (a DIR written by" in capsys.readouterr().err


def test_one_query_vector_or_lists_search_like_a_matrix(data):
    """encode("a string") gives a [dim] vector: search takes it as one query; lists of floats work as arrays."""
    queries, corpus = data
    indices, scores = minilm.search(queries[:1], corpus, top_k=3)
    for query, rows in ((queries[0], corpus), (queries[:1].tolist(), corpus.tolist())):
        got_indices, got_scores = minilm.search(query, rows, top_k=3)
        assert torch.equal(got_indices, indices) and torch.allclose(got_scores, scores)


def test_one_query_vector_of_another_size_is_refused(data):
    """A query cut to another size (truncate_dim) than the corpus's is refused, not broadcast or misread."""
    queries, corpus = data
    for query, rows, message in ((queries[0, :32], corpus, r"queries \(1, 32\) and corpus \(700, 40\) must be "
                                                           r"\[rows, dim\] with the same dim"),
                                 (queries[0, :32], pack_binary(corpus), "has 4 uint8 columns, not 5")):
        with pytest.raises(ValueError, match=message):
            minilm.search(query, rows, top_k=3)


def test_cli_search_prints_each_hit_on_one_line(tiny, tiny_dir, tmp_path, capsys):  # noqa: F811
    """A text or id holding a line break, a carriage return or a tab (JSONL escapes them) is printed escaped: a
    newline split the hit over two lines, and a carriage return printed the text over the hit's rank."""
    records = [("a\tb", "first line\nsecond line"), ("c", "back to the start\r of the line"), ("d\u2028e", "plain")]
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps({"_id": i, "text": t}) + "\n" for i, t in records))
    run(tiny, tmp_path / "docs.jsonl", tmp_path / "out", id_field="_id")
    main(["search", str(tmp_path / "out"), "a line", "--top-k", "3", "--device", "cpu"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 4 and all(line.startswith(f"   {rank}. ") for rank, line in enumerate(lines[1:], 1)), lines
    shown = dict(line.split("  ")[-2:] for line in lines[1:])  # "   1. 0.9352  id  text": id -> text
    assert shown == {"a\\tb": "first line\\nsecond line", "c": "back to the start\\r of the line",
                     "d\\u2028e": "plain"}, lines


def test_cli_search_into_a_closed_pipe_ends_quietly(tiny, tiny_dir, tmp_path):  # noqa: F811
    """search ... | head: the reader closes the pipe before the hits are printed. That printed a BrokenPipeError
    traceback; it now ends quietly with the status of a tool ended by SIGPIPE (141)."""
    (tmp_path / "docs.txt").write_text("".join(f"text number {i} about something\n" for i in range(40)))
    run(tiny, tmp_path / "docs.txt", tmp_path / "out")
    process = subprocess.Popen([sys.executable, "-m", "minilm", "search", str(tmp_path / "out"), "a text",
                                "--top-k", "40", "--device", "cpu"], cwd=REPO, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, env=child_env())
    process.stdout.close()  # before the model has loaded: every write to stdout fails
    assert process.wait(timeout=120) == 141 and process.stderr.read() == b""


def test_cli_search_reads_queries_from_a_file(tiny, tiny_dir, tmp_path, capsys):  # noqa: F811
    """Many queries had to go on the command line; --queries-file adds one a line (blank lines skipped) after
    the ones given there, and a file that cannot be read, or no query at all, is one line."""
    (tmp_path / "docs.txt").write_text("a dog runs\nthe market fell\n")
    run(tiny, tmp_path / "docs.txt", tmp_path / "out")
    (tmp_path / "queries.txt").write_text("the market fell\n\na dog runs\n")
    main(["search", str(tmp_path / "out"), "first", "--queries-file", str(tmp_path / "queries.txt"), "--top-k", "1",
          "--device", "cpu"])
    lines = capsys.readouterr().out.split("\n")
    assert [line for line in lines if line.startswith("query: ")] == ["query: first", "query: the market fell",
                                                                        "query: a dog runs"]
    assert lines[lines.index("query: a dog runs") + 1].split()[1:] == ["1.0000", "1", "a", "dog", "runs"]
    for argv, message in (([], "no queries: pass query texts, or --queries-file"),
                          (["--queries-file", str(tmp_path / "none.txt")], "--queries-file " + str(tmp_path))):
        with pytest.raises(SystemExit) as stop:
            main(["search", str(tmp_path / "out"), *argv])
        assert stop.value.code == 2 and message in capsys.readouterr().err
