"""Bad input to train.py: every case ends in exit status 2 and ONE stderr line `train.py: error: ...` that names
the flag, the file and line, or the field, with no traceback; nothing is created, and the user's files are
untouched. In-process (train.main) on the tiny random BERT: no Python start-up per case."""

import json
import os
from pathlib import Path

import pytest

import train
from minilm import checkpoint, run_folder

pytestmark = pytest.mark.usefixtures("one_thread")

PAIRS = "sentence1\tsentence2\tscore\n" + "".join(f"first {i}\tsecond {i}\t0.{i % 10}\n" for i in range(24))


class Context:
    def __init__(self, tmp: Path, tiny: Path):
        self.tmp, self.tiny = tmp, tiny
        self.out = tmp / "out"
        self.user_file = tmp / "thesis.docx"
        self.user_file.write_text("four years of work")
        self.pairs = self.write("pairs.tsv", PAIRS)
        self.docs = tmp / "docs"  # a user's folder
        self.docs.mkdir()
        (self.docs / "notes.txt").write_text("mine")

    def write_bytes(self, name: str, content: bytes) -> Path:
        path = self.tmp / name
        path.write_bytes(content)
        return path

    def box_with_data(self) -> Path:
        """A folder that holds training data."""
        box = self.tmp / "box"
        box.mkdir()
        (box / "pairs.tsv").write_text(PAIRS)
        return box

    def write(self, name: str, text: str) -> Path:
        path = self.tmp / name
        path.write_text(text, encoding="utf-8")
        return path

    def cosine(self, *extra, data=None):
        return ["--model", self.tiny, "--loss", "cosine", "--data", data or self.pairs, "--out", self.out,
                "--max-steps", 2, *extra]

    def loss(self, name, data, *extra):
        return ["--model", self.tiny, "--loss", name, "--data", data, "--out", self.out, "--max-steps", 2, *extra]


def call(capsys, argv) -> tuple:
    try:
        code = train.main(["--no-progress", *map(str, argv)])
    except SystemExit as exit:  # only --help may exit this way
        code = exit.code
    captured = capsys.readouterr()
    return code, captured.err


def stopped_run(capsys, monkeypatch, argv) -> None:
    """Run train.py as if Ctrl-C came during the first step: a stopped run (checkpoint at step 1) that --resume
    may continue (a finished run is refused before anything else)."""
    def stopped_at_once(self):
        self.signal = "SIGINT"
        return self
    with monkeypatch.context() as patch:
        patch.setattr(checkpoint.StopRequest, "__enter__", stopped_at_once)
        code, err = call(capsys, argv)
    assert code == 130, err


def assert_one_line_error(code, err, fragments):
    assert code == 2, err
    lines = err.strip("\n").splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("train.py: error: "), err
    assert "Traceback" not in err
    for fragment in fragments:
        assert str(fragment) in lines[0], (fragment, lines[0])


def jsonl(*records) -> str:
    return "".join(json.dumps(record) + "\n" for record in records)


def recipe(ctx, name, content):
    return ctx.write(name, content if isinstance(content, str) else json.dumps(content))


# (id, argv from the context, fragments the one line must hold; "{x}" is filled from the context)
CASES = [
    # flags: each names the flag and what it accepts
    ("batch-size-0", lambda c: c.cosine("--batch-size", 0), ["--batch-size", "whole number >= 1"]),
    ("batch-size-negative", lambda c: c.cosine("--batch-size", -3), ["--batch-size", ">= 1"]),
    ("batch-size-fraction", lambda c: c.cosine("--batch-size", 1.5), ["--batch-size", "'1.5'"]),
    ("grad-accum-0", lambda c: c.cosine("--grad-accum", 0), ["--grad-accum", ">= 1"]),
    ("log-steps-0", lambda c: c.cosine("--log-steps", 0), ["--log-steps", ">= 1"]),
    ("epochs-0", lambda c: c.cosine("--epochs", 0), ["--epochs", "a number > 0"]),
    ("epochs-negative", lambda c: c.cosine("--epochs", -1), ["--epochs", "> 0"]),
    ("epochs-nan", lambda c: c.cosine("--epochs", "nan"), ["--epochs", "'nan'"]),
    ("max-steps-negative", lambda c: c.cosine("--max-steps", -1), ["--max-steps", ">= 0"]),
    ("lr-0", lambda c: c.cosine("--lr", 0), ["--lr", "> 0"]),
    ("lr-text", lambda c: c.cosine("--lr", "fast"), ["--lr", "'fast'"]),
    ("lr-inf", lambda c: c.cosine("--lr", "inf"), ["--lr", "'inf'"]),
    ("warmup-ratio-1.5", lambda c: c.cosine("--warmup-ratio", 1.5), ["--warmup-ratio", "0..1"]),
    ("save-steps-negative", lambda c: c.cosine("--save-steps", -1), ["--save-steps", ">= 0"]),
    ("save-total-limit-0", lambda c: c.cosine("--save-total-limit", 0), ["--save-total-limit", ">= 1"]),
    ("max-seq-length-0", lambda c: c.cosine("--max-seq-length", 0), ["--max-seq-length", ">= 1"]),
    ("max-seq-length-too-long", lambda c: c.cosine("--max-seq-length", 9999), ["--max-seq-length 9999", "512"]),
    ("score-scale-0", lambda c: c.cosine("--score-scale", 0), ["--score-scale", "> 0"]),
    ("seed-negative", lambda c: c.cosine("--seed", -1), ["--seed", "'-1'", "0..4294967295"]),
    ("seed-too-large", lambda c: c.cosine("--seed", 2 ** 32), ["--seed", "0..4294967295"]),
    ("precision-int8", lambda c: c.cosine("--precision", "int8"), ["--precision", "'int8'", "fp32"]),
    ("precision-fp16-on-cpu", lambda c: c.cosine("--precision", "fp16", "--device", "cpu"),
     ["--precision fp16", "CUDA"]),
    ("unknown-loss", lambda c: c.cosine("--loss", "triplet"), ["--loss", "'triplet'", "mnrl"]),
    ("unknown-flag", lambda c: c.cosine("--learning-rate", 1), ["unrecognized arguments: --learning-rate"]),
    ("loss-params-not-json", lambda c: c.cosine("--loss-params", "{scale: 20"), ["--loss-params", "not valid JSON"]),
    ("loss-params-not-object", lambda c: c.cosine("--loss-params", "[20]"), ["--loss-params", "JSON object"]),
    ("loss-params-unknown-name", lambda c: c.loss("mnrl", c.pairs, "--loss-params", '{"temperature": 0.05}'),
     ["--loss-params", "mnrl loss takes", "scale"]),
    ("loss-params-bad-value", lambda c: c.loss("mnrl", c.pairs, "--loss-params", '{"similarity": "l2"}'),
     ["--loss-params", "similarity", "'l2'"]),
    ("loss-params-scale-text", lambda c: c.loss("mnrl", c.pairs, "--loss-params", '{"scale": "x"}'),
     ["--loss-params", "scale is 'x'", "a number > 0"]),
    ("loss-params-scale-zero", lambda c: c.loss("cosent", c.pairs, "--loss-params", '{"scale": 0}'),
     ["--loss-params", "scale is 0", "a number > 0"]),
    ("loss-params-scale-huge", lambda c: c.loss("mnrl", c.pairs, "--loss-params", '{"scale": 1e39}'),
     ["--loss-params", "scale is 1e+39", "at most 10000"]),
    ("loss-params-flag-text", lambda c: c.loss("mnrl", c.pairs, "--loss-params", '{"mask_duplicates": "no"}'),
     ["--loss-params", "mask_duplicates is 'no'", "true or false"]),
    ("loss-params-mini-batch-0", lambda c: c.loss("cached-mnrl", c.pairs, "--loss-params",
                                                  '{"mini_batch_size": 0}'), ["mini_batch_size is 0", ">= 1"]),
    ("loss-params-num-labels-text", lambda c: c.loss("softmax", c.pairs, "--loss-params", '{"num_labels": "3"}'),
     ["--loss-params", "num_labels is '3'", "whole number >= 2"]),
    ("loss-params-num-labels-fraction", lambda c: c.loss("softmax", c.pairs, "--loss-params",
                                                         '{"num_labels": 2.5}'), ["num_labels is 2.5"]),
    ("mnrl-on-nli-labels", lambda c: c.loss("mnrl", c.write("n.jsonl", jsonl(
        {"premise": "a", "hypothesis": "b", "label": "entailment"},
        {"premise": "c", "hypothesis": "d", "label": "contradiction"}))),
     ["n.jsonl", "label column", "contradictions", "--loss softmax"]),
    ("mnrl-on-binary-labels", lambda c: c.loss("mnrl", c.write("b.tsv", "sentence1\tsentence2\tlabel\na\tb\t1\n"
                                                                "c\td\t0\n")), ["b.tsv", "label column", "label 1"]),
    ("no-out", lambda c: ["--model", c.tiny, "--loss", "cosine", "--data", c.pairs], ["--out is required"]),
    ("no-loss", lambda c: ["--model", c.tiny, "--data", c.pairs, "--out", c.out], ["--loss is required", "a --recipe"]),
    ("no-data", lambda c: ["--model", c.tiny, "--loss", "cosine", "--out", c.out], ["--data is required"]),
    ("device-cuda-without-cuda", lambda c: c.cosine("--device", "cuda"), ["--device cuda", "no CUDA", "cpu"]),
    ("device-unknown", lambda c: c.cosine("--device", "banana"), ["--device banana", "'banana'", "cuda:N"]),
    ("in-batch-loss-batch-of-one", lambda c: c.loss("mnrl", c.pairs, "--batch-size", 1),
     ["--batch-size 1", "at least 2 rows"]),
    ("resume-and-overwrite", lambda c: ["--out", c.out, "--resume", "--overwrite"], ["--resume and --overwrite"]),
    ("model-missing", lambda c: c.cosine("--model", c.tmp / "no-such-model"),
     ["--model", "cannot find model", "no folder", "no-such-model"]),  # the whole message: one line
    ("model-is-a-file", lambda c: c.cosine("--model", c.pairs), ["cannot find model", "is a file, not a model folder"]),
    # recipes: the same checks, naming the recipe file and key
    ("recipe-without-data", lambda c: ["--recipe", recipe(c, "r.json", {"loss": "cosine"}), "--out", c.out],
     ["--data is required", "r.json"]),
    ("recipe-missing", lambda c: c.cosine("--recipe", c.tmp / "nope.json"), ["--recipe", "nope.json", "cannot read"]),
    ("recipe-malformed", lambda c: c.cosine("--recipe", recipe(c, "r.json", '{"loss": "cosine",\n "lr": }')),
     ["--recipe", "r.json:2", "not valid JSON"]),
    ("recipe-not-object", lambda c: c.cosine("--recipe", recipe(c, "r.json", [1, 2])), ["r.json", "JSON object"]),
    ("recipe-not-utf8", lambda c: c.cosine("--recipe", c.write_bytes("r.json", '{"lr": "é"}'.encode("latin-1"))),
     ["--recipe", "r.json", "not UTF-8"]),
    ("recipe-precision-int8", lambda c: c.cosine("--recipe", recipe(c, "r.json", {"precision": "int8"})),
     ["r.json", "'precision'", "'int8'"]),
    ("recipe-unknown-key", lambda c: c.cosine("--recipe", recipe(c, "r.json", {"learning_rate": 1})),
     ["r.json", "unknown key 'learning_rate'"]),
    ("recipe-batch-size-0", lambda c: c.cosine("--recipe", recipe(c, "r.json", {"batch_size": 0})),
     ["r.json", "'batch_size'", ">= 1"]),
    ("recipe-batch-size-text", lambda c: c.cosine("--recipe", recipe(c, "r.json", {"batch_size": "big"})),
     ["r.json", "'batch_size'", "'big'"]),
    ("recipe-epochs-0", lambda c: c.cosine("--recipe", recipe(c, "r.json", {"epochs": 0})),
     ["r.json", "'epochs'", "> 0"]),
    ("recipe-flag-not-bool", lambda c: c.cosine("--recipe", recipe(c, "r.json", {"no_progress": "yes"})),
     ["r.json", "'no_progress'", "true or false"]),
    ("recipe-data-number", lambda c: c.cosine("--recipe", recipe(c, "r.json", {"data": 5})),
     ["r.json", "'data'", "list of strings"]),
    ("recipe-prompts-number", lambda c: c.cosine("--recipe", recipe(c, "r.json", {"prompts": 3})),
     ["r.json", "'prompts' is 3, expected a string"]),
    ("recipe-teacher-number", lambda c: c.cosine("--recipe", recipe(c, "r.json", {"teacher": 0.5})),
     ["r.json", "'teacher' is 0.5, expected a string"]),
    ("recipe-loss-params-text", lambda c: c.cosine("--recipe", recipe(c, "r.json", {"loss_params": "x"})),
     ["r.json", "'loss_params'"]),
    ("recipe-with-resume", lambda c: ["--recipe", recipe(c, "r.json", {}), "--out", c.out, "--resume"],
     ["--recipe with --resume"]),
    # data: the file, the line, the field, what is accepted
    ("data-missing", lambda c: c.cosine(data=c.tmp / "nope.tsv"), ["nope.tsv", "no such file"]),
    ("data-folder-without-split", lambda c: c.cosine(data=c.tmp), [str(Path("train.tsv")), "STS-B folder"]),
    ("data-empty", lambda c: c.cosine(data=c.write("e.tsv", "")), ["e.tsv", "empty"]),
    ("data-header-only", lambda c: c.cosine(data=c.write("h.tsv", "sentence1\tsentence2\tscore\n")),
     ["h.tsv", "no rows"]),
    ("data-short-row", lambda c: c.cosine(data=c.write("s.tsv", PAIRS + "a\tb\n")), ["s.tsv:26", "2 fields"]),
    ("data-score-text", lambda c: c.cosine(data=c.write("s.tsv", PAIRS + "a\tb\thigh\n")),
     ["s.tsv:26", "score 'high'"]),
    ("data-score-0-to-5", lambda c: c.cosine(data=c.write("s.tsv", PAIRS + "a\tb\t4.2\n")),
     ["s.tsv:26", "score 4.2", "-1..1", "--score-scale 5"]),
    ("data-score-scaled-still-out", lambda c: c.cosine("--score-scale", 5, data=c.write("s.tsv", PAIRS + "a\tb\t42\n")),
     ["s.tsv:26", "8.4"]),
    ("data-score-nan", lambda c: c.cosine(data=c.write("s.tsv", PAIRS + "a\tb\tnan\n")), ["s.tsv:26", "finite"]),
    ("data-not-utf8", lambda c: c.cosine(data=c.write_bytes(
        "latin.tsv", "sentence1\tsentence2\tscore\ncafé\tb\t1\n".encode("latin-1"))), ["latin.tsv:2", "not UTF-8"]),
    ("jsonl-text-list", lambda c: c.cosine(data=c.write("d.jsonl", jsonl(
        {"sentence1": "a", "sentence2": "b", "score": 0.5}, {"sentence1": ["x"], "sentence2": "b", "score": 0.5}))),
     ["d.jsonl:2", "'sentence1'", "list", "string"]),
    ("jsonl-text-number", lambda c: c.cosine(data=c.write("d.jsonl", jsonl(
        {"sentence1": 3, "sentence2": "b", "score": 0.5}))), ["d.jsonl:1", "'sentence1'", "int"]),
    ("jsonl-text-null", lambda c: c.cosine(data=c.write("d.jsonl", jsonl(
        {"sentence1": "a", "sentence2": None, "score": 0.5}))), ["d.jsonl:1", "'sentence2'", "null"]),
    ("jsonl-text-bool", lambda c: c.cosine(data=c.write("d.jsonl", jsonl(
        {"sentence1": True, "sentence2": "b", "score": 0.5}))), ["d.jsonl:1", "'sentence1'", "bool"]),
    ("jsonl-score-bool", lambda c: c.cosine(data=c.write("d.jsonl", jsonl(
        {"sentence1": "a", "sentence2": "b", "score": True}))), ["d.jsonl:1", "score True"]),
    ("jsonl-lone-surrogate", lambda c: c.cosine(data=c.write("d.jsonl", '{"sentence1": "a", "sentence2": "b", '
                                                                '"score": 0.5}\n{"sentence1": "a\\ud800", '
                                                                '"sentence2": "b", "score": 0.5}\n')),
     ["d.jsonl:2", "'sentence1'", "surrogate"]),
    ("jsonl-text-field-not-in-first-record", lambda c: c.loss("mnrl", c.write("d.jsonl", jsonl(
        {"anchor": "a", "positive": "b"}, {"anchor": "c", "positive": "d", "negative": "x"}))),
     ["d.jsonl:2", "['negative']", "first record"]),
    ("tabs-in-a-csv-named-file", lambda c: c.loss("mnrl", c.write("pairs", "anchor\tpositive\na\tb\nc\td\n")),
     ["pairs:1", "holding tabs", ".tsv"]),
    ("mnrl-on-0-to-5-scores", lambda c: c.loss("mnrl", c.write("s.tsv", "sentence1\tsentence2\tscore\na\tb\t4.5\n"
                                                                 "c\td\t1.0\ne\tf\t5\n")),
     ["s.tsv", "scores run up to 5", "--score-scale 5"]),
    ("header-column-twice", lambda c: c.loss("mnrl", c.write("d.tsv", "anchor\tanchor\tpositive\na\tb\tc\n")),
     ["d.tsv:1", "'anchor' twice"]),
    ("header-column-and-its-alias", lambda c: c.loss("mnrl", c.write("d.csv", "query,anchor,positive\na,b,c\n")),
     ["d.csv:1", "'query' and 'anchor'"]),
    ("jsonl-broken", lambda c: c.cosine(data=c.write("d.jsonl", '{"sentence1": "a",\n')), ["d.jsonl:1", "JSON"]),
    ("jsonl-array", lambda c: c.cosine(data=c.write("d.jsonl", '["a", "b", 0.5]\n')), ["d.jsonl:1", "JSON object"]),
    ("jsonl-missing-column", lambda c: c.cosine(data=c.write("d.jsonl", jsonl(
        {"sentence1": "a", "sentence2": "b", "score": 0.5}, {"sentence1": "a", "score": 0.5}))),
     ["d.jsonl:2", "'sentence2'"]),
    ("softmax-label-outside",
     lambda c: c.loss("softmax", c.write("n.tsv", "premise\thypothesis\tlabel\na\tb\t0\nc\td\t7\n")),
     ["n.tsv:3", "label '7'", "0..2"]),
    ("softmax-label-fraction", lambda c: c.loss("softmax", c.write("n.jsonl", jsonl(
        {"premise": "a", "hypothesis": "b", "label": 1.5}))), ["n.jsonl:1", "label 1.5"]),
    ("softmax-label-outside-num-labels",
     lambda c: c.loss("softmax", c.write("n.tsv", "premise\thypothesis\tlabel\na\tb\t2\n"),
                      "--loss-params", '{"num_labels": 2}'), ["n.tsv:2", "0..1"]),
    ("columns-do-not-fit", lambda c: c.cosine(data=c.write("a.tsv", "anchor\tpositive\nq\tp\n")),
     ["a.tsv", "do not fit", "sentence1, sentence2, score"]),
    ("softmax-on-scored-pairs", lambda c: c.loss("softmax", c.pairs), ["pairs.tsv", "do not fit", "label"]),
    ("min-score-filters-everything", lambda c: c.loss("mnrl", c.pairs, "--min-score", 2),
     ["pairs.tsv", "--min-score 2", "0..0.9"]),
    ("in-batch-all-duplicates", lambda c: c.loss("mnrl", c.write("d.tsv", "anchor\tpositive\n" + "same\ttext\n" * 9)),
     ["no batch", "mnrl"]),
    ("grad-accum-beyond-epoch", lambda c: c.cosine("--grad-accum", 8, "--batch-size", 16),
     ["--grad-accum 8", "2 batch(es)"]),
    # (a TSV field that opens a quote, or is wholly in quotes around a lone quote, is literal text: tests/test_readers.py)
    ("csv-quote-never-closes", lambda c: c.cosine(data=c.write("q.csv", 'sentence1,sentence2,score\na,b,0.5\n'
                                                                 '"a,b,0.5\nc,d,0.5\n')), ["q.csv:3", "never closes"]),
    ("csv-bad-quoting", lambda c: c.cosine(data=c.write("q.csv", 'sentence1,sentence2,score\n"a"x,b,0.5\n')),
     ["q.csv:2", "CSV"]),
    ("eval-task-stsb-on-a-file", lambda c: c.cosine("--eval-task", "stsb", "--eval-data", c.pairs),
     ["--eval-task stsb", "STS-B folder"]),
    ("eval-task-stsb-without-eval-data", lambda c: c.cosine("--eval-task", "stsb"),
     ["--eval-task stsb", "STS-B folder", "without --eval-data it evaluates on the first --data"]),
    ("eval-task-stsb-on-a-missing-path", lambda c: c.cosine("--eval-task", "stsb", "--eval-data", c.tmp / "gone"),
     ["--eval-task stsb", "gone", "nothing at that path"]),  # not "not a file"
    ("eval-task-nli-without-classifier", lambda c: c.cosine("--eval-task", "nli"), ["--eval-task nli", "classifier"]),
    # output folders
    ("out-is-a-file", lambda c: c.cosine("--out", c.user_file), ["--out", "thesis.docx", "is a file"]),
    ("out-is-the-current-folder", lambda c: c.cosine("--out", "."), ["--out .", "current folder"]),
    ("out-above-the-current-folder", lambda c: c.cosine("--out", ".."), ["--out ..", "current folder"]),
    ("out-holds-the-data",
     lambda c: c.cosine("--out", c.tmp / "box", "--overwrite", data=c.box_with_data() / "pairs.tsv"),
     ["--out", "box", "holds --data"]),
    ("out-is-the-teacher",  # a run trained before, distilled into a new run in its place: it would be replaced
     lambda c: c.loss("mse", c.pairs, "--teacher", c.box_with_data(), "--out", c.tmp / "box", "--overwrite"),
     ["--out", "box", "holds --teacher"]),
    ("out-user-folder", lambda c: c.cosine("--out", c.docs), ["--out", "docs", "not empty", "notes.txt"]),
    ("out-user-folder-overwrite", lambda c: c.cosine("--out", c.docs, "--overwrite"),
     ["--out", "docs", "--overwrite replaces only a previous minilm run", "notes.txt"]),
    ("resume-without-run", lambda c: ["--out", c.docs, "--resume"], ["--resume", "no minilm run", "minilm-run.json"]),
    ("resume-in-a-new-folder", lambda c: ["--out", c.out, "--resume"], ["--resume", "no minilm run"]),
]


@pytest.mark.parametrize("case", CASES, ids=[case[0] for case in CASES])
def test_bad_input_is_one_line(case, capsys, tiny_model_dir, tmp_path, monkeypatch):
    name, make_argv, fragments = case
    work = tmp_path / "work"  # the current folder of the run: data lives beside it, not in it
    work.mkdir()
    monkeypatch.chdir(work)
    context = Context(tmp_path, tiny_model_dir)
    argv = make_argv(context)
    before = {path: path.read_bytes() for path in tmp_path.rglob("*") if path.is_file()}
    code, err = call(capsys, argv)
    assert_one_line_error(code, err, fragments)
    assert not context.out.exists(), "a refused run created its folder"
    after = {path: path.read_bytes() for path in tmp_path.rglob("*") if path.is_file()}
    assert after == before, "a refused run wrote, changed or removed a file"
    assert not any(path.name.endswith((".minilm-new", ".minilm-old")) for path in tmp_path.iterdir())


def test_overwrite_refuses_a_folder_with_user_files_and_changes_nothing(capsys, tiny_model_dir, tmp_path):
    context = Context(tmp_path, tiny_model_dir)
    user = tmp_path / "u"
    user.mkdir()
    (user / "thesis.docx").write_text("keep")
    code, err = call(capsys, context.cosine("--out", user, "--overwrite"))
    assert_one_line_error(code, err, ["--out", "--overwrite replaces only a previous minilm run", "thesis.docx"])
    assert os.listdir(user) == ["thesis.docx"] and (user / "thesis.docx").read_text() == "keep"


def test_overwrite_refuses_a_run_folder_with_an_added_user_file(capsys, tiny_model_dir, tmp_path):
    context = Context(tmp_path, tiny_model_dir)
    out = tmp_path / "run"
    code, err = call(capsys, context.cosine("--out", out, "--save-steps", 0))
    assert code == 0, err
    (out / "notes.txt").write_text("mine")
    before = sorted(os.listdir(out))
    code, err = call(capsys, context.cosine("--out", out, "--overwrite"))
    assert_one_line_error(code, err, ["notes.txt", "no minilm run wrote"])
    assert sorted(os.listdir(out)) == before
    code, err = call(capsys, context.cosine("--out", out))
    assert_one_line_error(code, err, ["not empty", "--resume continues it, --overwrite replaces it"])


def test_a_second_run_on_a_held_folder_is_refused(capsys, tiny_model_dir, tmp_path, monkeypatch):
    """While one run holds the folder's lock, --resume and --overwrite on it are refused; the lock is the
    kernel's (flock), so a killed run leaves none behind (tests/test_train.py resumes killed runs)."""
    context = Context(tmp_path, tiny_model_dir)
    out = tmp_path / "run"
    stopped_run(capsys, monkeypatch, context.cosine("--out", out, "--save-steps", 1))
    before = sorted(os.listdir(out))
    overwrite = ["--model", tiny_model_dir, "--loss", "cosine", "--data", context.pairs, "--out", out, "--overwrite"]
    with run_folder.folder_lock(out, str(out)):
        for argv in (["--out", out, "--resume", "--max-steps", 3], overwrite):
            code, err = call(capsys, argv)
            assert_one_line_error(code, err, ["--out", "another train.py", f"pid {os.getpid()}"])
    assert sorted(os.listdir(out)) == before
    assert not run_folder.staging_folder(out).exists()


def test_resume_refusals(capsys, tiny_model_dir, tmp_path, monkeypatch):
    context = Context(tmp_path, tiny_model_dir)
    out = tmp_path / "run"
    stopped_run(capsys, monkeypatch, context.cosine("--out", out, "--max-steps", 4, "--save-steps", 2))
    stopped_run(capsys, monkeypatch, ["--out", out, "--resume"])  # on to step 2
    for argv, fragments in [
        (["--resume", "--batch-size", 4], ["--batch-size 4", "used 32", "--max-steps"]),
        (["--resume", "--loss", "cosent"], ["--loss cosent", "used cosine"]),
        (["--resume", "--max-steps", 1], ["--max-steps 1", "step 2 already"]),
    ]:
        code, err = call(capsys, ["--out", out, *argv])
        assert_one_line_error(code, err, fragments)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-0000001", "step-0000002"]
    code, err = call(capsys, ["--out", out, "--resume"])
    assert code == 0, err
    code, err = call(capsys, ["--out", out, "--resume"])  # finished: nothing to resume
    assert_one_line_error(code, err, ["--out", "this run finished", "--overwrite"])


def test_score_scale_trains_on_0_to_5_scores(capsys, tiny_model_dir, tmp_path):
    """The documented way to train on STS-style scores: --score-scale 5 (the card records it)."""
    context = Context(tmp_path, tiny_model_dir)
    rows = "".join(f"a{i}\tb{i}\t{i % 6}\n" for i in range(20))  # scores 0..5
    data = context.write("sts.tsv", "sentence1\tsentence2\tscore\n" + rows)
    code, err = call(capsys, context.cosine("--score-scale", 5, "--save-steps", 0, data=data))
    assert code == 0, err
    assert "- `score_scale`: 5.0" in (context.out / "README.md").read_text()


def test_empty_texts_train_with_a_note(capsys, tiny_model_dir, tmp_path):
    context = Context(tmp_path, tiny_model_dir)
    data = context.write("e.tsv", "sentence1\tsentence2\tscore\n" + "".join(
        f"{'' if i % 4 == 0 else f'a{i}'}\tb{i}\t0.5\n" for i in range(16)))
    code, err = call(capsys, context.cosine("--save-steps", 0, data=data))
    assert code == 0, err
    assert "note:" in err and "4 of 16 rows have an empty or blank text" in err


def test_min_score_says_how_many_pairs_a_loss_without_labels_keeps(capsys, tiny_model_dir, tmp_path):
    context = Context(tmp_path, tiny_model_dir)
    data = context.write("s.tsv", "sentence1\tsentence2\tscore\n" + "".join(
        f"a{i}\tb{i}\t{0.9 if i % 2 else 0.2}\n" for i in range(16)))
    code, err = call(capsys, context.loss("mnrl", data, "--save-steps", 0))
    assert code == 0, err
    assert "note:" in err and "8 of 16 pairs score at least --min-score 0.8" in err


@pytest.mark.parametrize("variable, value, fragment", [
    ("MINILM_ATTENTION", "bogus", "unknown attention backend 'bogus' (from $MINILM_ATTENTION)"),
    ("MINILM_POOLING", "triton", "pooling 'triton' cannot run here"),
])
def test_a_bad_fast_path_in_the_environment_is_refused_before_anything_is_written(
        capsys, tiny_model_dir, tmp_path, monkeypatch, variable, value, fragment):
    import eval as eval_script

    monkeypatch.setenv(variable, value)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr("minilm.kernels.available", lambda: False)  # as on a machine without Triton or a GPU
    context = Context(tmp_path, tiny_model_dir)
    code, err = call(capsys, context.cosine())
    assert_one_line_error(code, err, [fragment])
    assert not context.out.exists()
    code = eval_script.main(["--model", str(tiny_model_dir), "--task", "pairs", "--data", str(context.pairs)])
    err = capsys.readouterr().err
    assert code == 2 and fragment in err and len(err.strip().splitlines()) == 1


def test_evaluating_on_the_training_file_itself_is_said(capsys, tiny_model_dir, tmp_path):
    context = Context(tmp_path, tiny_model_dir)
    code, err = call(capsys, context.cosine("--save-steps", 0, "--eval-task", "pairs"))
    assert code == 0, err
    assert "note: --eval-task pairs without --eval-data scores the training file" in err
