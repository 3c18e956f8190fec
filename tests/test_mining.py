"""mine.py: mined negatives equal a brute-force ranking over the full similarity matrix; exclusions hold; the
CLI writes rows train.py reads, atomically, and refuses to overwrite."""

import itertools
import json
import os
import stat
import subprocess
import sys

import numpy as np
import pytest

import mine
from minilm import data

from conftest import REPO


@pytest.fixture(scope="module")
def tiny_model(tiny_model_dir):
    """conftest's tiny random BERT (2 layers, width 64, real tokenizer, no dropout), loaded as a user's model is."""
    import minilm

    return minilm.load(str(tiny_model_dir), device="cpu")


SUBJECTS = ["a cat", "a dog", "the chef", "a child", "the old man"]
ACTIONS = ["sleeps on the sofa", "eats dinner", "plays in the park", "reads a book", "runs to the station"]


def small_pairs():
    """~20 pairs over 25 short sentences, with the cases mining must get right: an anchor with two positives,
    a positive shared by two anchors, and an anchor that is also another pair's positive."""
    sentences = [f"{s} {a}" for s, a in itertools.product(SUBJECTS, ACTIONS)]
    pairs = [(sentences[i], sentences[(i * 7 + 3) % 25]) for i in range(18)]
    pairs.append((sentences[0], sentences[12]))  # a second positive for anchor 0
    pairs.append((sentences[20], pairs[1][1]))  # a positive shared with pair 1
    pairs.append((pairs[2][1], sentences[2]))  # pair 2's positive as an anchor, pair 2's anchor as its positive
    return pairs, sentences


def brute_force(model, pairs, corpus, n, range_min, range_max, absolute=None, relative=None):
    """Every anchor against every candidate (the full matrix, float64), exclusions and window by hand; anchors
    embedded as queries, every other text as a document (the model's prompts for each, where it has them)."""
    candidates = list(dict.fromkeys(corpus))
    texts = list(dict.fromkeys(candidates + [positive for _, positive in pairs]))
    anchors = list(dict.fromkeys(anchor for anchor, _ in pairs))

    def unit(vectors):
        vectors = vectors.astype(np.float64)
        return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)

    vector = dict(zip(texts, unit(model.encode_document(texts))))
    query = dict(zip(anchors, unit(model.encode_query(anchors))))
    positives_of = {}
    for anchor, positive in pairs:
        positives_of.setdefault(anchor, set()).add(positive)
    expected = []
    for anchor, positive in pairs:
        never = positives_of[anchor] | {anchor}
        order = sorted((c for c in candidates if c not in never), key=lambda c: -float(query[anchor] @ vector[c]))
        positive_score = float(query[anchor] @ vector[positive])
        eligible = [c for c in order[range_min:range_max]
                    if (absolute is None or float(query[anchor] @ vector[c]) <= positive_score - absolute)
                    and (relative is None or float(query[anchor] @ vector[c]) <= positive_score * (1 - relative))]
        expected.append(eligible[:n] if len(eligible) >= n else None)
    return expected


@pytest.mark.parametrize("options", [
    dict(n=3, range_min=0, range_max=10),
    dict(n=2, range_min=2, range_max=8, relative=0.05),
    dict(n=2, range_min=0, range_max=12, absolute=0.1),
])
def test_mined_negatives_equal_brute_force(tiny_model, options):
    pairs, sentences = small_pairs()
    corpus = sentences + ["a cat sleeps on the sofa"]  # a corpus text equal to a positive and an anchor
    rows, dropped = mine.mine(tiny_model, pairs, corpus, num_negatives=options["n"], range_min=options["range_min"],
                              range_max=options["range_max"], absolute_margin=options.get("absolute"),
                              relative_margin=options.get("relative"), corpus_chunk=7, query_chunk=5)
    expected = brute_force(tiny_model, pairs, corpus, options["n"], options["range_min"], options["range_max"],
                           options.get("absolute"), options.get("relative"))
    assert dropped == sum(e is None for e in expected)
    assert [r for r in expected if r is not None] == [[row[f"negative_{k + 1}"] for k in range(options["n"])]
                                                     for row in rows]
    positives_of = {}
    for anchor, positive in pairs:
        positives_of.setdefault(anchor, set()).add(positive)
    for row in rows:
        negatives = [row[f"negative_{k + 1}"] for k in range(options["n"])]
        assert not set(negatives) & (positives_of[row["anchor"]] | {row["anchor"]})
        assert len(set(negatives)) == len(negatives)


def test_a_model_with_a_truncate_dim_mines_at_that_size(tiny_model_dir):
    """A model saved with a truncate_dim (a Matryoshka model's) ranks by the embeddings its encode returns."""
    import minilm

    truncated = minilm.load(str(tiny_model_dir), device="cpu", truncate_dim=16)
    pairs, sentences = small_pairs()
    rows, _ = mine.mine(truncated, pairs, sentences, num_negatives=2, range_max=10, encode_window=7)
    expected = brute_force(truncated, pairs, sentences, 2, 0, 10)
    assert [[row["negative_1"], row["negative_2"]] for row in rows] == [e for e in expected if e is not None]


def test_a_model_with_prompts_mines_with_its_query_and_document_prompts(tiny_model_dir):
    """A model trained with --prompts ranks its anchors as queries and the corpus as documents, each with its
    prompt, as sentence-transformers' mine_hard_negatives (encode_query / encode_document) and eval.py do."""
    import minilm

    prompted = minilm.load(str(tiny_model_dir), device="cpu")
    prompted.prompts = {"query": "find the sentence most like this one please: ", "document": "passage: "}
    pairs, sentences = small_pairs()
    rows, _ = mine.mine(prompted, pairs, sentences, num_negatives=2, range_max=10, relative_margin=0.01)
    expected = brute_force(prompted, pairs, sentences, 2, 0, 10, relative=0.01)
    assert [[row["negative_1"], row["negative_2"]] for row in rows] == [e for e in expected if e is not None]


def test_random_sampling_is_seeded_and_drawn_from_the_window(tiny_model):
    pairs, _ = small_pairs()
    top, _ = mine.mine(tiny_model, pairs, num_negatives=6, range_max=6)
    first, _ = mine.mine(tiny_model, pairs, num_negatives=2, range_max=6, sampling="random", seed=1)
    again, _ = mine.mine(tiny_model, pairs, num_negatives=2, range_max=6, sampling="random", seed=1)
    other, _ = mine.mine(tiny_model, pairs, num_negatives=2, range_max=6, sampling="random", seed=2)
    assert first == again and first != other
    for drawn, window in zip(first, top):
        assert {drawn["negative_1"], drawn["negative_2"]} <= {window[f"negative_{k}"] for k in range(1, 7)}


def test_cli_writes_rows_train_reads_and_refuses_to_overwrite(tiny_model, tmp_path, capsys):
    from losses import LOSSES
    from minilm.training_data import columns_for_loss

    pairs, _ = small_pairs()
    source = tmp_path / "pairs.tsv"
    source.write_text("anchor\tpositive\n" + "".join(f"{a}\t{p}\n" for a, p in pairs))
    out = tmp_path / "triplets.jsonl"
    assert mine.main(["--model", str(tiny_model.source_dir), "--data", str(source), "--out", str(out),
                      "--num-negatives", "2", "--batch-size", "8"]) == 0
    rows = data.read_dataset(out).rows
    assert len(rows) == len(pairs)
    _, columns, _ = columns_for_loss(rows, LOSSES["mnrl"], 0.8, str(out))
    assert columns == ["anchor", "positive", "negative_1", "negative_2"]
    before = out.read_bytes()
    assert mine.main(["--model", str(tiny_model.source_dir), "--data", str(source), "--out", str(out)]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert out.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary left
    out.write_text("an earlier output\n")
    previous = os.umask(0o027)
    try:
        assert mine.main(["--model", str(tiny_model.source_dir), "--data", str(source), "--out", str(out),
                          "--num-negatives", "2", "--batch-size", "8", "--overwrite"]) == 0
    finally:
        os.umask(previous)
    assert out.read_bytes() == before  # replaced, with the mode of a new file (not a temporary file's 0600)
    assert stat.S_IMODE(out.stat().st_mode) == 0o640
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []

    # A TSV corpus is read by its --corpus-column (never as raw lines: no header or id mined as a text), the same
    # candidates as a text file holding the texts alone.
    texts = list(dict.fromkeys(p for _, p in pairs))
    (tmp_path / "corpus.tsv").write_text("id\tbody\n" + "".join(f"{i}\t{t}\n" for i, t in enumerate(texts)))
    (tmp_path / "corpus.txt").write_text("".join(f"{t}\n" for t in texts))
    mined = []
    for corpus, extra in (("corpus.tsv", ["--corpus-column", "body"]), ("corpus.txt", [])):
        target = tmp_path / f"from-{corpus}.jsonl"
        assert mine.main(["--model", str(tiny_model.source_dir), "--data", str(source), "--out", str(target),
                          "--corpus", str(tmp_path / corpus), *extra]) == 0
        mined.append(target.read_bytes())
    assert mined[0] == mined[1] and b"id\tbody" not in mined[0]


@pytest.mark.parametrize("argv, message", [
    (["--data", "{missing}"], "no such file"),
    (["--data", "{bad_columns}"], "needs anchor and positive"),
    (["--data", "{pairs}", "--range-min", "5", "--range-max", "5"], "--range-min"),
    (["--data", "{pairs}", "--relative-margin", "1.5"], "--relative-margin"),
    (["--data", "{pairs}", "--out", "{folder}"], "is a folder: --out is the JSONL file to write"),
    (["--data", "{pairs}", "--corpus", "{pairs}"], "name the column holding the texts with --corpus-column"),
    (["--data", "{pairs}", "--corpus", "{pairs}", "--corpus-column", "body"], "no column 'body' (columns: anchor, "
                                                                              "positive); pass --corpus-column"),
    (["--data", "{pairs}", "--num-negatives", "0"], "--num-negatives must be at least 1, not 0"),
    (["--data", "{pairs}", "--sampling", "best"], "--sampling: invalid choice: 'best'"),  # argparse's own errors
    (["--data", "{pairs}", "--batch-size", "many"], "--batch-size: invalid int value: 'many'"),
    (["--data", "{pairs}", "--out", "{nested}"], "the folder"),
    (["--data", "{pairs}", "--model", "{missing}"], "--model {missing}: cannot find model '{missing}': no folder"),
    (["--out", "{nested}"], "the following arguments are required: --data"),
    # JSON lines in a .tsv would be misread by train.py, which picks its reader by extension
    (["--data", "{pairs}", "--out", "{tsv_out}"], "--out {tsv_out}: mine.py writes JSON lines, so --out must end "
                                                  "in .jsonl (or .json), not .tsv"),
    (["--data", "{pairs}", "--out", "{bare_out}"], "(or .json), and it has no extension"),
    # each flag blamed by its own name, not as the --model's fault; none silently ignored
    (["--data", "{pairs}", "--device", "foo"], "--device foo: device 'foo' is not a torch device"),
    (["--data", "{pairs}", "--corpus-column", "text"], "--corpus-column text: names the text column of --corpus, "
                                                       "which is not given"),
    (["--data", "{pairs}", "--corpus", "{plain_jsonl}"], "a document without the field '_id': without "
                                                         "--corpus-column, a JSONL --corpus is read as a BEIR"),
])
def test_cli_bad_input_is_one_line(tmp_path, capsys, argv, message):
    (tmp_path / "bad.tsv").write_text("sentence1\tsentence2\na\tb\n")
    (tmp_path / "pairs.tsv").write_text("anchor\tpositive\na\tb\n")
    (tmp_path / "plain.jsonl").write_text('{"body": "a cat"}\n')
    paths = {"missing": tmp_path / "nope.tsv", "bad_columns": tmp_path / "bad.tsv", "pairs": tmp_path / "pairs.tsv",
             "folder": tmp_path, "nested": tmp_path / "no-folder" / "o.jsonl", "tsv_out": tmp_path / "o.tsv",
             "bare_out": tmp_path / "negatives", "plain_jsonl": tmp_path / "plain.jsonl"}
    argv, message = [a.format(**paths) for a in argv], message.format(**paths)
    code = mine.main(["--model", "unused-model", "--out", str(tmp_path / "o.jsonl"), *argv])
    err = capsys.readouterr().err
    # One line, as train.py and eval.py: no usage block, even for argparse's own errors.
    assert code == 2 and len(err.strip().splitlines()) == 1 and err.startswith("mine.py: error: "), err
    assert message in err
    assert not (tmp_path / "o.jsonl").exists() and not (tmp_path / "o.tsv").exists()


def test_cli_blames_max_seq_length_on_its_flag(tiny_model_dir, tmp_path, capsys):
    (tmp_path / "pairs.tsv").write_text("anchor\tpositive\na\tb\n")
    code = mine.main(["--model", str(tiny_model_dir), "--data", str(tmp_path / "pairs.tsv"), "--max-seq-length", "0",
                      "--out", str(tmp_path / "o.jsonl")])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("mine.py: error: --max-seq-length 0: ") and len(err.splitlines()) == 1, err


def test_help_shows_the_default_of_each_flag_that_has_one(capsys):
    with pytest.raises(SystemExit):
        mine.main(["--help"])
    options = " ".join(capsys.readouterr().out.split("\noptions:\n", 1)[1].split())
    for flag, default in (("--sampling {top,random}", "top"), ("--query-chunk QUERY_CHUNK", "1024"),
                          ("--corpus-chunk CORPUS_CHUNK", "16384"), ("--encode-window ENCODE_WINDOW", "16384")):
        assert f"(default: {default})" in options.split(flag, 1)[1].split(" --", 1)[0], flag


def beir_folder(folder):
    (folder / "qrels").mkdir(parents=True)
    (folder / "corpus.jsonl").write_text('{"_id": "d1", "title": "", "text": "a cat sleeps"}\n')
    (folder / "queries.jsonl").write_text('{"_id": "q1", "text": "where is the cat"}\n')
    (folder / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\nq1\td1\t1\n")
    return folder


@pytest.mark.parametrize("data, out, extra, what", [
    ("pairs.tsv", "pairs.tsv", [], "is the --data file"),
    ("pairs.tsv", "sub/../pairs.tsv", [], "is the --data file"),
    ("pairs.tsv", "link.tsv", [], "is the --data file"),  # a symbolic link to the input
    ("pairs.tsv", "hard.tsv", [], "is the --data file"),  # a hard link: the same file under another name
    ("beir", "beir/corpus.jsonl", ["--split", "test"], "a file of the --data folder"),
    ("beir", "beir/qrels/test.tsv", ["--split", "test"], "a file of the --data folder"),
    ("beir", "beir/qrels/../queries.jsonl", ["--split", "test"], "a file of the --data folder"),
    ("pairs.tsv", "corpus.txt", ["--corpus", "corpus.txt"], "is the --corpus file"),
    ("pairs.tsv", "link-to-corpus.txt", ["--corpus", "sub/../corpus.txt"], "is the --corpus file"),
    ("pairs.tsv", "model/config.json", ["--model", "model"], "a file of the --model folder"),
])
def test_overwrite_never_replaces_an_input(tmp_path, capsys, monkeypatch, data, out, extra, what):
    """--overwrite replaces an earlier output, never an input: an --out that is (links and ../ resolved) the --data
    file, a file of the --data or --model folder or the --corpus file is refused in one line, before the model is
    loaded ("unused-model" is no model), and every input keeps its bytes."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "sub").mkdir()
    (tmp_path / "pairs.tsv").write_text("anchor\tpositive\na\tb\n")
    (tmp_path / "corpus.txt").write_text("a\nb\nc\n")
    (tmp_path / "link.tsv").symlink_to(tmp_path / "pairs.tsv")
    (tmp_path / "link-to-corpus.txt").symlink_to("corpus.txt")
    (tmp_path / "hard.tsv").hardlink_to(tmp_path / "pairs.tsv")
    beir_folder(tmp_path / "beir")
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{}")
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    argv = ["--model", "unused-model", "--data", data, "--out", out, "--overwrite", *extra]
    code = mine.main(argv)
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert err.startswith(f"mine.py: error: --out {out}: ") and what in err and "never an input" in err
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before


def documented_mine_commands() -> dict:
    """The mine.py commands the docs give, as a user would paste them: docs/retrieval.md's first (continuation lines
    joined) and recipe 000_scifact_mnrl_hard_negatives's "First: ..." step."""
    lines = (REPO / "docs" / "retrieval.md").read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if "python mine.py --model" in line and "--out" not in line)
    end = next(i for i in range(start, len(lines)) if not lines[i].endswith("\\"))
    recipe = json.loads((REPO / "recipes" / "000_scifact_mnrl_hard_negatives.json").read_text())
    return {"docs/retrieval.md": "\n".join(lines[start:end + 1]), "recipe": recipe["description"].split("First: ", 1)[1]}


@pytest.mark.parametrize("where", ["docs/retrieval.md", "recipe"])
def test_documented_mine_command_works_on_a_fresh_checkout(tmp_path, where):
    """A fresh clone has no runs/data, and mine.py writes only into a folder that exists (tested above: "the
    folder"): the documented command must make it. Run in an empty folder with a stand-in for mine.py that
    needs what the real one needs of --out (the real run takes the SciFact data and minutes)."""
    command = documented_mine_commands()[where]
    assert "python mine.py" in command and "--out runs/data/" in command
    stand_in = tmp_path / "mine_stand_in.py"
    stand_in.write_text("import sys, pathlib\nout = pathlib.Path(sys.argv[sys.argv.index('--out') + 1])\n"
                        "sys.exit(0 if out.parent.is_dir() else f'the folder {out.parent} does not exist')\n")
    fresh = tmp_path / "checkout"
    fresh.mkdir()
    result = subprocess.run(["bash", "-c", command.replace("python mine.py", f"{sys.executable} {stand_in}")],
                            cwd=fresh, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
