"""BEIR-layout retrieval evaluation: the reader (missing files, ids that resolve nowhere, CRLF, graded qrels,
queries without judgements), metrics equal to sentence-transformers' evaluator on the same embeddings, exact
chunked ranking; the SNLI reader and the Quora split of the recipes."""

import gzip
import importlib.util
import json
import os
import stat

import numpy as np
import pytest
import torch

from minilm import data, evaluation

from conftest import REPO, shared_data
from test_evaluation import fixed_model, unprefixed


def write_beir(folder, corpus, queries, qrels_lines, split="test", newline="\r\n"):
    (folder / "qrels").mkdir(parents=True, exist_ok=True)
    (folder / "corpus.jsonl").write_text("".join(json.dumps(d) + "\n" for d in corpus))
    (folder / "queries.jsonl").write_text("".join(json.dumps(q) + "\n" for q in queries))
    (folder / "qrels" / f"{split}.tsv").write_bytes(
        newline.join(["query-id\tcorpus-id\tscore", *qrels_lines, ""]).encode())
    return folder


def small_beir(folder, rng):
    corpus = [{"_id": f"d{i:03d}", "title": f"title {i}" if i % 3 else "", "text": f"doc {i}"} for i in range(60)]
    queries = [{"_id": f"q{i}", "text": f"query {i}"} for i in range(25)]
    lines = []
    for i in range(20):  # q20..q24 have no judgement; q19 only a 0 (judged not relevant)
        for j in rng.choice(60, rng.integers(1, 4), replace=False):
            lines.append(f"q{i}\td{j:03d}\t{0 if i == 19 else int(rng.integers(1, 3))}")
    return write_beir(folder, corpus, queries, lines)


def test_beir_metrics_match_sentence_transformers(tmp_path, capfd):
    pytest.importorskip("sentence_transformers")
    from sentence_transformers.sentence_transformer.evaluation import InformationRetrievalEvaluator

    folder = small_beir(tmp_path / "beir", np.random.default_rng(0))
    queries, corpus, relevant = evaluation.load_beir(folder, "test")
    assert corpus["d000"] == "doc 0" and corpus["d001"] == "title 1 doc 1"  # title + " " + text; no title: text
    assert max(g for docs in relevant.values() for g in docs.values()) == 2 and "q19" not in relevant
    model = fixed_model(list(queries.values()) + list(corpus.values()), dim=4, duplicates_every=7)  # ties
    evaluator = evaluation.for_task("retrieval", folder, "test")
    ours = evaluator(model)
    assert capfd.readouterr().err.count("6 of 25 queries have no relevance judgement") == 1
    binary = {q: set(docs) for q, docs in relevant.items()}
    theirs = unprefixed(InformationRetrievalEvaluator(queries, corpus, binary, name="x", write_csv=False)(model), "x")
    assert set(ours) == {f"cosine_{m}@{k}" for m, ks in evaluation.RETRIEVAL_KS.items() for k in ks}
    for key, value in ours.items():
        assert abs(value - theirs[key]) < 1e-6, (key, value, theirs[key])


def brute_force(queries, corpus, depth, skip=None):
    scores = torch.nn.functional.normalize(queries, dim=-1) @ torch.nn.functional.normalize(corpus, dim=-1).T
    hits = []
    for row in range(len(queries)):
        order = np.lexsort((np.arange(corpus.shape[0]), -scores[row].numpy()))
        hits.append([int(i) for i in order if skip is None or i != skip[row]][:depth])
    return hits


def exact_vectors(count: int, generator) -> torch.Tensor:
    """[count, 16] rows of -1, 0, 1 whose cosines every summation order computes exactly: each row has 4 or 16
    non-zero entries (norm 2 or 4, so normalizing divides by a power of two), and every cosine is a multiple of
    1/16 summed from multiples of 1/16. Equal rows then get equal scores under any matmul chunking or CPU kernel;
    random floats do not (summation order decides the last bit, and with it the tie)."""
    signs = torch.randint(0, 2, (count, 16), generator=generator).float() * 2 - 1
    sparse = torch.rand(count, 1, generator=generator) < 0.5
    keep = torch.rand(count, 16, generator=generator).argsort(dim=1) < 4  # 4 random places per row
    return torch.where(sparse & ~keep, torch.zeros_like(signs), signs)


def test_chunked_ranking_equals_brute_force_with_ties_and_skipped_self():
    generator = torch.Generator().manual_seed(0)
    corpus = exact_vectors(40, generator)
    corpus[10:20] = corpus[5]  # many equal scores across chunk borders and at the depth cut
    queries = torch.cat([corpus[:6], exact_vectors(5, generator)])
    scores = torch.nn.functional.normalize(queries, dim=-1) @ torch.nn.functional.normalize(corpus, dim=-1).T
    assert torch.equal(scores * 16, (scores * 16).round())  # exact, as exact_vectors promises
    assert all(len(set(row.tolist())) < 30 for row in scores)  # ties well beyond the copies of row 5
    skip = list(range(6)) + [-1] * 5
    for skipped in (None, skip):
        expected = brute_force(queries, corpus, 8, skipped)
        for query_chunk, corpus_chunk in ((3, 7), (1, 1), (1024, 65536)):
            assert evaluation.ranked_hits(queries, corpus, 8, query_chunk, corpus_chunk, skipped) == expected
    # The tie rule itself: equal scores rank the lower corpus index first, a skipped index never appears.
    assert evaluation.ranked_hits(queries[5:6], corpus, 11)[0] == [5, *range(10, 20)]
    assert evaluation.ranked_hits(queries[5:6], corpus, 10, skip=[5])[0] == list(range(10, 20))


@pytest.mark.parametrize("damage, message", [
    (lambda f: (f / "corpus.jsonl").unlink(), "corpus.jsonl: no such file"),
    (lambda f: (f / "queries.jsonl").unlink(), "queries.jsonl: no such file"),
    (lambda f: (f / "qrels" / "test.tsv").rename(f / "qrels" / "dev.tsv"), "test.tsv: no such file (splits found: dev)"),
    (lambda f: f.joinpath("qrels", "test.tsv").write_text("query-id\tcorpus-id\tscore\nq1\td001\t1\nq99\td001\t1\n"),
     "test.tsv:3: query id 'q99' is not in queries.jsonl"),
    (lambda f: f.joinpath("qrels", "test.tsv").write_text("q1\td001\t1\r\nq1\td999\t1\r\n"),
     "test.tsv:2: corpus id 'd999' is not in corpus.jsonl"),
    (lambda f: f.joinpath("qrels", "test.tsv").write_text("query-id\tcorpus-id\tscore\nq1 d001 1\n"),
     "test.tsv:2: 1 tab-separated fields"),
    (lambda f: f.joinpath("qrels", "test.tsv").write_text("header\tline\tscore\nq1\td001\thigh\n"),
     "test.tsv:2: score 'high' is not a whole number"),
    (lambda f: f.joinpath("qrels", "test.tsv").write_text("q1\td001\t1.0\nq1\td002\t1\n"),  # no header: not skipped
     "test.tsv:1: score '1.0' is not a whole number"),
    (lambda f: f.joinpath("qrels", "test.tsv").write_text("query-id\tcorpus-id\tscore\nq1\td001\t0\n"),
     "no relevant (score > 0) judgement"),
    (lambda f: f.joinpath("corpus.jsonl").write_text('{"_id": "d001", "text": "x"}\n{"_id": "d002", "text": "y"\n'),
     "corpus.jsonl:2: not valid JSON"),
    (lambda f: f.joinpath("corpus.jsonl").write_text('{"_id": "d001", "text": "x"}\n{"text": "y"}\n'),
     "corpus.jsonl:2: a document without the field '_id'"),
    (lambda f: f.joinpath("corpus.jsonl").write_text('{"_id": "d001", "text": "x"}\n{"_id": "d001", "text": "y"}\n'),
     "corpus.jsonl:2: the _id 'd001' appears twice"),
    (lambda f: f.joinpath("queries.jsonl").write_text("\n"), "queries.jsonl: the file is empty"),
    (lambda f: f.joinpath("corpus.jsonl").write_text('{"_id": "d001", "text": "x"}\n{"_id": null, "text": "y"}\n'),
     "corpus.jsonl:2: _id null is not a string or a whole number"),
    (lambda f: f.joinpath("queries.jsonl").write_text('{"_id": 1.0, "text": "x"}\n'),
     "queries.jsonl:1: _id 1.0 is not a string or a whole number"),
    (lambda f: f.joinpath("queries.jsonl").write_bytes(b'{"_id": "q1", "text": "x"}\n{"_id": "q2", "text": "\xff"}\n'),
     "queries.jsonl:2: bytes that are not UTF-8"),
])
def test_reader_errors_name_the_file_and_line(tmp_path, damage, message):
    folder = small_beir(tmp_path / "beir", np.random.default_rng(1))
    damage(folder)
    with pytest.raises(data.DataError) as error:
        evaluation.for_task("retrieval", folder, "test")
    assert message in str(error.value) and "\n" not in str(error.value)


def self_judged_beir(folder, texts=("a red apple", "the stock market", "a dog in the park", "rain over the sea")):
    """Queries and documents numbered separately, both from "1", and query i judged relevant to document i: the
    folder that scored 0.0000 on every metric, silently (BEIR's convention skips a document with the query's id)."""
    corpus = [{"_id": str(i), "title": "", "text": text} for i, text in enumerate(texts, 1)]
    queries = [{"_id": str(i), "text": text} for i, text in enumerate(texts, 1)]
    return write_beir(folder, corpus, queries, [f"{i}\t{i}\t1" for i in range(1, len(texts) + 1)])


def test_judged_documents_with_the_query_id_are_skipped_loudly_or_counted_on_request(tmp_path, capfd):
    """The evaluator (train.py's in-training evaluation and eval.py's) says how many judged pairs BEIR's
    convention skips, naming the flag; keep_self_matches counts them."""
    folder = self_judged_beir(tmp_path / "beir")
    model = fixed_model(["a red apple", "the stock market", "a dog in the park", "rain over the sea"])
    skipped = evaluation.for_task("retrieval", folder, "test")(model)
    err = capfd.readouterr().err
    assert "warning: 4 of 4 judged (query, document) pairs" in err and "--keep-self-matches" in err
    assert len(err.strip().splitlines()) == 1 and set(skipped.values()) == {0.0}
    kept = evaluation.for_task("retrieval", folder, "test", keep_self_matches=True)(model)
    assert kept["cosine_ndcg@10"] == kept["cosine_accuracy@1"] == 1.0 and "warning" not in capfd.readouterr().err
    # Queries that are corpus entries, judged relevant to other entries (a duplicate-questions split): the skip
    # is what the folder means, and nothing is said.
    write_beir(tmp_path / "dup", [{"_id": "1", "text": "x"}, {"_id": "2", "text": "y"}],
               [{"_id": "1", "text": "x"}, {"_id": "2", "text": "y"}], ["1\t2\t1", "2\t1\t1"])
    evaluation.for_task("retrieval", tmp_path / "dup", "test")
    assert "warning" not in capfd.readouterr().err
    with pytest.raises(ValueError, match="--keep-self-matches is for the retrieval task on a BEIR folder"):
        evaluation.for_task("pairs", tmp_path / "pairs.tsv", "test", keep_self_matches=True)


def test_eval_py_keep_self_matches(tmp_path, capfd, tiny_model_dir):
    import eval as eval_script

    folder = self_judged_beir(tmp_path / "beir")
    argv = ["--model", str(tiny_model_dir), "--task", "retrieval", "--data", str(folder), "--device", "cpu"]
    assert eval_script.main(argv) == 0
    out, err = capfd.readouterr()
    assert "4 of 4 judged (query, document) pairs" in err and "--keep-self-matches" in err
    assert "cosine_ndcg@10                   0.0000" in out
    assert eval_script.main([*argv, "--keep-self-matches"]) == 0
    out, err = capfd.readouterr()
    assert "cosine_ndcg@10                   1.0000" in out and "warning" not in err
    (tmp_path / "pairs.tsv").write_text("sentence1\tsentence2\tscore\na\tb\t0.5\n")
    assert eval_script.main(["--model", str(tiny_model_dir), "--task", "pairs", "--data", str(tmp_path / "pairs.tsv"),
                             "--keep-self-matches"]) == 2
    assert "--keep-self-matches is for --task retrieval on a BEIR folder" in capfd.readouterr().err


def test_retrieval_on_a_file_without_pairs_names_the_columns(tmp_path):
    (tmp_path / "docs.jsonl").write_text('{"_id": "d1", "title": "", "text": "x"}\n')
    with pytest.raises(data.DataError, match=r"docs.jsonl: columns \['_id', 'text', 'title'\]; the retrieval task "
                                             r"reads anchor, positive \(or a BEIR folder"):
        evaluation.for_task("retrieval", tmp_path / "docs.jsonl", "test")


def test_beir_pairs_are_the_judged_query_document_pairs(tmp_path):
    corpus = [{"_id": "a", "title": "T", "text": "alpha"}, {"_id": "b", "text": "beta"}]
    queries = [{"_id": "1", "text": "one"}, {"_id": "2", "text": "two"}]
    folder = write_beir(tmp_path / "beir", corpus, queries, ["1\ta\t1", "1\tb\t2", "2\tb\t0"], split="train",
                        newline="\n")
    assert evaluation.beir_pairs(folder, "train") == [{"anchor": "one", "positive": "T alpha"},
                                                      {"anchor": "one", "positive": "beta"}]


def test_snli_reader(tmp_path, capfd):
    path = tmp_path / "snli_1.0_dev.jsonl.gz"
    records = [{"sentence1": "A", "sentence2": "B", "gold_label": label}
               for label in ("neutral", "-", "entailment", "contradiction", "-")]
    with gzip.open(path, "wt") as out:
        out.writelines(json.dumps(r) + "\n" for r in records)
    rows = data.load_snli(path)
    assert [r["label"] for r in rows] == [1, 0, 2] and rows[0]["premise"] == "A" and rows[0]["hypothesis"] == "B"
    assert capfd.readouterr().err.count("2 pairs without a gold label") == 1
    assert data.is_snli(path) and not data.is_snli(tmp_path / "pairs.jsonl")
    with gzip.open(path, "wt") as out:
        out.write(json.dumps(records[0]) + "\n" + json.dumps({"sentence1": "A", "gold_label": "neutral"}) + "\n")
    with pytest.raises(data.DataError, match=r"snli_1.0_dev.jsonl.gz:2: missing or non-text field\(s\) \['sentence2'\]"):
        data.load_snli(path)


def test_real_snli_files():
    for split, unlabelled in (("dev", 158), ("test", 176)):
        rows = data.load_snli(shared_data("snli", f"snli_1.0_{split}.jsonl.gz"))
        assert len(rows) == 10_000 - unlabelled and {r["label"] for r in rows} == {0, 1, 2}


@pytest.fixture(scope="module")
def split_pairs():
    spec = importlib.util.spec_from_file_location("split_pairs", REPO / "recipes" / "split_pairs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def quora_like(path):
    lines = ["anchor\tpositive"] + [f"question {i}\tquestion {i} again" for i in range(80)]
    lines += [f"question {i}\tquestion {i} once more" for i in range(0, 80, 4)]  # linked pairs: split as a group
    path.write_text("\n".join(lines) + "\n")
    return path


def test_quora_split_is_deterministic_and_disjoint(tmp_path, split_pairs):
    quora_like(tmp_path / "pairs.tsv")
    outputs = []
    for name in ("a", "b"):
        assert split_pairs.main([str(tmp_path / "pairs.tsv"), "--out", str(tmp_path / name)]) == 0
        outputs.append([(tmp_path / name / f).read_bytes() for f in ("train.tsv", "test/corpus.jsonl",
                                                                      "test/qrels/test.tsv")])
    assert outputs[0] == outputs[1]
    train_texts = {t for row in data.read_dataset(tmp_path / "a" / "train.tsv").rows for t in row.values()}
    queries, corpus, relevant = evaluation.load_beir(tmp_path / "a" / "test", "test")
    assert not train_texts & set(corpus.values()) and queries.keys() == corpus.keys()
    assert 10 <= sum(len(docs) for docs in relevant.values()) / 2 <= 14  # ~10% of the 100 pairs
    evaluator = evaluation.for_task("retrieval", tmp_path / "a" / "test", "test")
    assert all(evaluator.skip[i] == evaluator.corpus_ids.index(q) for i, q in enumerate(evaluator.query_ids))


def files_in(folder) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def one_line_error(capsys, code, fragments):
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and err.startswith("split_pairs.py: error: "), err
    for fragment in fragments:
        assert fragment in err, (fragment, err)


@pytest.mark.parametrize("data, out", [
    ("x/train.tsv", "x"),  # the audit's case: the input is the train.tsv the split writes
    ("x/test/qrels/test.tsv", "x"),
    ("link.tsv", "x"),  # a symbolic link to x/train.tsv
    ("x/train.tsv", "x/../x"),
])
@pytest.mark.parametrize("overwrite", [[], ["--overwrite"]])
def test_split_never_writes_over_its_input(tmp_path, capsys, monkeypatch, split_pairs, data, out, overwrite):
    monkeypatch.chdir(tmp_path)
    quora_like(tmp_path / "pairs.tsv")
    assert split_pairs.main(["pairs.tsv", "--out", "x"]) == 0
    capsys.readouterr()
    (tmp_path / "link.tsv").symlink_to(tmp_path / "x" / "train.tsv")
    before = files_in(tmp_path)
    code = split_pairs.main([data, "--out", out, *overwrite])
    one_line_error(capsys, code, [f"--out {out}: the split would write", f"over the input {data}", "never the input"])
    assert files_in(tmp_path) == before


def test_split_replaces_an_earlier_split_only_with_overwrite(tmp_path, capsys, split_pairs):
    quora_like(tmp_path / "pairs.tsv")
    fresh, out = tmp_path / "fresh", tmp_path / "out"
    assert split_pairs.main([str(tmp_path / "pairs.tsv"), "--out", str(fresh)]) == 0
    out.mkdir()
    (out / "train.tsv").write_text("anchor\tpositive\nan earlier\tsplit\n")
    (out / "notes.txt").write_text("the user's")
    before = files_in(out)
    code = split_pairs.main([str(tmp_path / "pairs.tsv"), "--out", str(out)])
    one_line_error(capsys, code, [f"--out {out}: holds train.tsv already", "--overwrite"])
    assert files_in(out) == before
    previous = os.umask(0o027)
    try:
        assert split_pairs.main([str(tmp_path / "pairs.tsv"), "--out", str(out), "--overwrite"]) == 0
    finally:
        os.umask(previous)
    # The split's four files, as a fresh split writes them and with a new file's mode; the user's file untouched.
    assert files_in(out) == {**files_in(fresh), "notes.txt": b"the user's"}
    assert {stat.S_IMODE(p.stat().st_mode) for p in out.rglob("*") if p.is_file() and p.name != "notes.txt"} == {0o640}
    (out / "train.tsv").unlink()
    code = split_pairs.main([str(tmp_path / "pairs.tsv"), "--out", str(out)])  # test/ alone is an earlier split too
    one_line_error(capsys, code, [f"--out {out}: holds test already", "--overwrite"])


def test_an_interrupted_split_leaves_no_half_file(tmp_path, monkeypatch, split_pairs):
    quora_like(tmp_path / "pairs.tsv")
    out = tmp_path / "out"
    assert split_pairs.main([str(tmp_path / "pairs.tsv"), "--out", str(out)]) == 0
    before = files_in(out)
    (tmp_path / "pairs.tsv").write_text("anchor\tpositive\n" + "".join(f"new {i}\tnew {i} again\n" for i in range(50)))

    def interrupted(path, text):  # Ctrl-C halfway through writing the corpus
        with split_pairs.files.replaced_atomically(path) as temporary:
            temporary.write_text(text[: len(text) // 2])
            if path.name == "corpus.jsonl":
                raise KeyboardInterrupt

    monkeypatch.setattr(split_pairs.files, "write_text", interrupted)
    with pytest.raises(KeyboardInterrupt):
        split_pairs.main([str(tmp_path / "pairs.tsv"), "--out", str(out), "--overwrite"])
    after = files_in(out)
    assert after.keys() == before.keys()  # no temporary file left
    assert after["test/corpus.jsonl"] == before["test/corpus.jsonl"]  # the old corpus, whole
    assert after["train.tsv"] != before["train.tsv"]  # written (in halves, by this stand-in) before the corpus


@pytest.mark.parametrize("argv, fragments", [
    (["pairs.tsv", "--out", "o", "--test-fraction", "1.5"], ["--test-fraction must be between 0 and 1"]),
    (["bad.tsv", "--out", "o"], ["bad.tsv: needs anchor and positive columns"]),
    (["missing.tsv", "--out", "o"], ["missing.tsv"]),
    (["pairs.tsv", "--out", "pairs.tsv"], ["--out pairs.tsv: is a file"]),
    (["pairs.tsv"], ["the following arguments are required: --out"]),
])
def test_split_bad_input_is_one_line(tmp_path, capsys, monkeypatch, split_pairs, argv, fragments):
    monkeypatch.chdir(tmp_path)
    quora_like(tmp_path / "pairs.tsv")
    (tmp_path / "bad.tsv").write_text("sentence1\tsentence2\na\tb\n")
    before = files_in(tmp_path)
    one_line_error(capsys, split_pairs.main(argv), fragments)
    assert files_in(tmp_path) == before


@pytest.mark.parametrize("recipe, columns, count", [
    ("003_snli_softmax.json", ["premise", "hypothesis", "label"], 10_000 - 158),
    ("000_scifact_mnrl.json", ["anchor", "positive"], 919)])
def test_reference_trainer_reads_the_rows_train_py_reads(recipe, columns, count):
    """benchmarks/reference_retrieval_train.py feeds sentence-transformers' trainer through train.py's readers: a
    change of their signatures must fail here, not an hour into benchmarks/retrieval_recipes.py."""
    recipe = json.loads((REPO / "recipes" / recipe).read_text())
    for location in recipe["data"]:
        shared_data(*location.split("shared/data/")[1].split("/"))
    spec = importlib.util.spec_from_file_location("reference", REPO / "benchmarks" / "reference_retrieval_train.py")
    reference = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(reference)
    rows, text_columns, label = reference.training_rows(recipe, [str(REPO / path) for path in recipe["data"]])
    assert [*text_columns, *([label] if label else [])] == columns and len(rows) == count
    assert all(isinstance(row[c], str) and row[c] for row in rows for c in text_columns)
