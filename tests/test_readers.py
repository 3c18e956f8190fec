"""One reader for every file minilm reads (minilm/data.py): TSV quoting, CSV as RFC 4180, lines that end at \\n or
\\r\\n only; the same line gives the same fields to train.py, eval.py, mine.py and python -m minilm encode; every
file minilm writes (mine.py, recipes/split_pairs.py, a corpus's ids.txt) reads back unchanged; and any text that
csv's writer, a pandas-style writer or json.dumps writes reads back unchanged (hypothesis, a fixed seed)."""

import csv
import importlib.util
import io
import json

import pytest
from hypothesis import HealthCheck, assume, given, settings, strategies as st

import mine
from minilm import corpus, data, evaluation
from minilm.training_data import load_training_rows

from conftest import REPO, shared_data

# Characters str.splitlines() ends a line at, which minilm reads as text inside a line.
NOT_LINE_ENDS = ["\u2028", "\u2029", "\x85", "\x0b", "\x0c", "\x1c", "\x1d", "\x1e", "\r"]
# Texts the round trips carry: quotes in every position, a lone quote in a quoted-looking text, emoji, combining
# marks, and every character above.
TRICKY = ['"Yes," she said, "no."', '"This is an extremely heartrending time', '"quoted"', 'say ""hi""', '"',
          'a "b" c', "emoji 😀👍🏽", "combining e\u0301 n\u0303", "zero\u200bwidth", " spaced ", "",
          *(f"line{c}inside" for c in NOT_LINE_ENDS)]


def table_reader(path, column: str, id_column: str):
    """(text, id) of each record as python -m minilm encode reads them."""
    return [(text, record_id) for _, _, text, record_id in corpus.Reader(path, field=column,
                                                                        id_field=id_column).records()]


# --- the TSV rule ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("line, fields", [
    ('"Yes," she said, "no."\tb', ['"Yes," she said, "no."', "b"]),  # wholly in quotes, a lone quote inside
    ('"This is an extremely heartrending time\tb', ['"This is an extremely heartrending time', "b"]),  # never closed
    ("\"Oh, you're such a good person!\tYou're such a bad person!\"",  # STS-B train.tsv: two literal fields
     ["\"Oh, you're such a good person!", "You're such a bad person!\""]),
    ('"He said ""hi"""\t"b"', ['He said "hi"', "b"]),  # csv/pandas quoting
    ('a "b" c\t"', ['a "b" c', '"']),
    ('""\t"""\t"a"b"', ["", '"""', '"a"b"']),
    ('"a"" b\t', ['"a"" b', ""]),
])
def test_a_tsv_field_is_quoted_only_when_wholly_in_quotes_with_every_inner_quote_doubled(line, fields):
    assert data.tsv_fields(line) == fields


def test_tsv_lines_that_open_quotes_are_text_for_train_and_encode_alike(tmp_path):
    """The issue's lines, refused by train.py before: the same fields for train.py (read_dataset), eval.py and
    python -m minilm encode (corpus.Reader)."""
    texts = ['"Yes," she said, "no."', '"This is an extremely heartrending time', 'say ""hi""', '"quoted"']
    path = tmp_path / "pairs.tsv"
    path.write_text("anchor\tpositive\n" + "".join(f"{t}\tp{i}\n" for i, t in enumerate(texts)), encoding="utf-8")
    expected = ['"Yes," she said, "no."', '"This is an extremely heartrending time', 'say ""hi""', "quoted"]
    rows, lines, _ = load_training_rows(str(path), "train")
    assert [row["anchor"] for row in rows] == expected and lines == [2, 3, 4, 5]
    assert table_reader(path, "anchor", "positive") == [(t, f"p{i}") for i, t in enumerate(expected)]
    evaluator = evaluation.for_task("retrieval", path, "test")
    assert evaluator.queries == expected


def test_stsb_read_as_a_tsv_with_named_columns(tmp_path):
    """Every line of STS-B, read as a TSV with its columns named, is a row (train.tsv has 14 lines whose quotes
    the old reader refused); a sentence is the file's text, less quotes only where it is wholly quoted."""
    header = "genre\tfile\tyear\tid\tscore\tsentence1\tsentence2\n"
    for split in ("train", "dev", "test"):
        raw = [line.split("\t")[:7] for line in data.read_lines(shared_data("stsb", f"{split}.tsv"))]
        path = tmp_path / f"{split}.tsv"
        path.write_text(header + "".join("\t".join(fields) + "\n" for fields in raw), encoding="utf-8")
        rows = data.read_dataset(path).rows
        assert len(rows) == len(raw)
        unclosed = 0
        for row, fields in zip(rows, raw):
            for column, field in (("sentence1", fields[5]), ("sentence2", fields[6])):
                inner = field[1:-1]
                wholly = len(field) > 1 and field[0] == field[-1] == '"' and '"' not in inner.replace('""', "")
                assert row[column] == (inner.replace('""', '"') if wholly else field)
                unclosed += field.startswith('"') and not wholly
        assert unclosed >= {"train": 10, "dev": 2, "test": 1}[split]


# --- CSV (RFC 4180) --------------------------------------------------------------------------------------------

def test_csv_quoted_fields_hold_commas_quotes_and_line_breaks(tmp_path):
    path = tmp_path / "pairs.csv"
    path.write_bytes('anchor,positive\r\n"two\r\nlines, and ""quotes""",5" screen\r\n\r\nnext,"a\nb"\n'
                     .encode("utf-8"))
    rows, lines, _ = load_training_rows(str(path), "train")
    expected = [("two\r\nlines, and \"quotes\"", '5" screen'), ("next", "a\nb")]
    assert [(row["anchor"], row["positive"]) for row in rows] == expected and lines == [2, 5]
    assert table_reader(path, "anchor", "positive") == expected
    reader = corpus.Reader(path, field="anchor", id_field="positive")
    for offset, number, text, record_id in reader.records():  # each record read again from its offset alone
        assert next(reader.records(offset))[2:] == (text, record_id)


@pytest.mark.parametrize("content, where, message", [
    ('a,b\n"x"y,z\n', ":2:", "follows its closing quote"),
    ('a,b\nc,d\n"open,\nstill open\n', ":3:", "never closes"),
])
def test_csv_that_breaks_rfc_4180_names_its_line(tmp_path, content, where, message):
    path = tmp_path / "bad.csv"
    path.write_text(content)
    with pytest.raises(data.DataError, match=message) as error:
        data.read_dataset(path)
    assert f"{path}{where}" in str(error.value)
    with pytest.raises(corpus.CorpusError, match=message) as error:
        table_reader(path, "a", None)
    assert f"{path} line {where.strip(':')}" in str(error.value)


# --- lines end at \n and \r\n only -----------------------------------------------------------------------------

@pytest.mark.parametrize("character", NOT_LINE_ENDS)
def test_lines_end_at_newline_only_in_every_reader(tmp_path, character):
    text = f"before{character}after"
    (tmp_path / "d.tsv").write_text(f"anchor\tpositive\r\n{text}\tp\r\n", encoding="utf-8", newline="")
    (tmp_path / "d.csv").write_text(f"anchor,positive\n{text},p\n", encoding="utf-8", newline="")
    (tmp_path / "d.jsonl").write_text(json.dumps({"anchor": text, "positive": "p"}, ensure_ascii=False) + "\n",
                                      encoding="utf-8", newline="")
    (tmp_path / "d.txt").write_text(f"{text}\nsecond\n", encoding="utf-8", newline="")
    for name in ("d.tsv", "d.csv", "d.jsonl"):
        assert data.read_dataset(tmp_path / name).rows == [{"anchor": text, "positive": "p"}], name
    for name in ("d.tsv", "d.csv"):
        assert table_reader(tmp_path / name, "anchor", "positive") == [(text, "p")], name
    assert [r[2] for r in corpus.Reader(tmp_path / "d.jsonl", field="anchor").records()] == [text]
    assert [r[2] for r in corpus.Reader(tmp_path / "d.txt").records()] == [text, "second"]
    assert mine.read_corpus_texts(tmp_path / "d.txt") == [text, "second"]
    beir = tmp_path / "beir"
    (beir / "qrels").mkdir(parents=True)
    (beir / "corpus.jsonl").write_text(json.dumps({"_id": "d1", "title": "", "text": text}, ensure_ascii=False)
                                       + "\n", encoding="utf-8", newline="")
    (beir / "queries.jsonl").write_text(json.dumps({"_id": "q1", "text": text}, ensure_ascii=False) + "\n",
                                        encoding="utf-8", newline="")
    (beir / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\nq1\td1\t1\n")
    queries, documents, relevant = evaluation.load_beir(beir, "test")
    assert queries == {"q1": text} and documents == {"d1": text.strip()} and relevant == {"q1": {"d1": 1}}


def test_a_jsonl_text_with_a_raw_tab_is_read_as_written(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"anchor": "a\tb", "positive": "c"}\n', encoding="utf-8")  # a writer that left a tab raw
    assert data.read_dataset(path).rows == [{"anchor": "a\tb", "positive": "c"}]


# --- files minilm writes read back unchanged -------------------------------------------------------------------

def test_mined_rows_read_back_unchanged_by_train_py(tmp_path, tiny_model_dir):
    """The issue's case: mine.py writes JSON lines with ensure_ascii=False (U+2028 raw), which train.py refused."""
    anchors = [f"{text} {i}" for i, text in enumerate(TRICKY)] + ["a\ttab", "a\nnew line"]
    pairs = [{"anchor": anchor, "positive": f"answer to {anchor}"} for anchor in anchors]
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs), encoding="utf-8")
    out = tmp_path / "mined.jsonl"
    assert mine.main(["--model", str(tiny_model_dir), "--data", str(tmp_path / "pairs.jsonl"), "--out", str(out),
                      "--device", "cpu"]) == 0
    assert "\u2028" in out.read_text(encoding="utf-8")  # written raw, as the issue found it
    written = [json.loads(line) for line in out.read_text(encoding="utf-8").split("\n") if line]
    rows, _, _ = load_training_rows(str(out), "train")
    assert rows == written and [(r["anchor"], r["positive"]) for r in rows] == [tuple(p.values()) for p in pairs]
    positives = {p["positive"] for p in pairs}
    assert all(row["negative_1"] in positives for row in rows)


def test_a_split_reads_back_unchanged(tmp_path):
    """recipes/split_pairs.py's train.tsv (quoted where a text starts with a quote) and BEIR folder. (The BEIR
    reader strips a document's text, BEIR's and MTEB's choice; the tokenizer drops that whitespace anyway.)"""
    spec = importlib.util.spec_from_file_location("split_pairs", REPO / "recipes" / "split_pairs.py")
    split_pairs = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(split_pairs)
    pairs = [(f"{text} {i}", f"{text} again {i}") for i, text in enumerate(TRICKY * 3)]
    pairs += [(f'"{i}"', f'"{i} too"') for i in range(10)]  # wholly quoted texts: must be written quoted
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps({"anchor": a, "positive": p}) + "\n" for a, p in pairs),
                                          encoding="utf-8")
    assert split_pairs.main([str(tmp_path / "pairs.jsonl"), "--out", str(tmp_path / "split")]) == 0
    kept, held = split_pairs.split(pairs, 0.1)
    assert kept and held
    train_rows = data.read_dataset(tmp_path / "split" / "train.tsv").rows
    assert [(row["anchor"], row["positive"]) for row in train_rows] == kept
    queries, documents, relevant = evaluation.load_beir(tmp_path / "split" / "test", "test")
    assert sorted(queries.values()) == sorted({text for pair in held for text in pair})
    assert sorted(documents.values()) == sorted({text.strip() for pair in held for text in pair})
    judged = {(queries[q], documents[d]) for q, docs in relevant.items() for d in docs}
    assert judged == {pair for a, p in held for pair in ((a, p.strip()), (p, a.strip()))}
    (tmp_path / "tab.jsonl").write_text(json.dumps({"anchor": "a\tb", "positive": "c"}) + "\n")
    assert split_pairs.main([str(tmp_path / "tab.jsonl"), "--out", str(tmp_path / "t")]) == 2  # no TSV holds a tab


def test_tsv_writer_quotes_what_the_reader_would_misread():
    fields = ['"quoted"', '"Yes," she said', "ends\r", "plain", "", 'in "middle"']
    line = data.write_tsv_line(fields)
    assert line == '"""quoted"""\t"""Yes,"" she said"\t"ends\r"\tplain\t\tin "middle"\n'
    assert data.tsv_fields(data.strip_line_ending(line)) == fields
    for bad in ("a\tb", "a\nb"):
        with pytest.raises(ValueError, match="tab or a line break"):
            data.write_tsv_line([bad])


def test_corpus_ids_and_texts_read_back_unchanged(tmp_path, tiny_model_dir, capsys):
    """python -m minilm encode's ids.txt and search give back the ids and texts of the input, whatever they hold;
    a byte-order mark before the first record is not part of its text, read in order or by offset."""
    import minilm
    from minilm.__main__ import main

    ids = [f"id {i} {text[:12]}".replace("\r", "") for i, text in enumerate(TRICKY)]  # ids.txt: one a line
    (tmp_path / "in.jsonl").write_text("\ufeff" + "".join(json.dumps({"id": i, "text": t}, ensure_ascii=False) + "\n"
                                                          for i, t in zip(ids, TRICKY)), encoding="utf-8")
    model = minilm.load(str(tiny_model_dir), device="cpu")
    corpus.encode_corpus(model, tmp_path / "in.jsonl", tmp_path / "out", str(tiny_model_dir), id_field="id",
                         progress=False, log=lambda message: None)
    folder = corpus.Corpus(tmp_path / "out")
    rows = list(range(len(TRICKY)))
    assert folder.ids(rows) == ids and folder.texts(rows) == TRICKY
    main(["search", str(tmp_path / "out"), TRICKY[6], "--top-k", "1", "--model", str(tiny_model_dir)])
    assert f"{ids[6]}  {TRICKY[6]}" in capsys.readouterr().out
    tsv = tmp_path / "in.tsv"
    tsv.write_text("\ufeffid\ttext\n" + "".join(data.write_tsv_line([i, t]) for i, t in zip(ids, TRICKY)),
                   encoding="utf-8")
    assert table_reader(tsv, "text", "id") == list(zip(TRICKY, ids))


# --- any text a writer writes reads back unchanged (hypothesis) --------------------------------------------------

# Texts built from the characters that matter (drawn often) and any other character (no lone surrogates: not UTF-8).
PIECES = ['"', ",", "\t", "\n", "\r", " ", "a", "😀", "\u0301", "\ufeff", *NOT_LINE_ENDS]
TEXT = st.lists(st.one_of(st.sampled_from(PIECES), st.characters(blacklist_categories=("Cs",))),
                max_size=10).map("".join)
ROWS = st.lists(st.tuples(TEXT, TEXT), min_size=1, max_size=5)
PROPERTY = settings(max_examples=60, derandomize=True, database=None, deadline=None,  # the same examples every run
                    suppress_health_check=[HealthCheck.function_scoped_fixture])


def pandas_style(rows, separator: str) -> str:
    """What pandas' DataFrame.to_csv(sep=separator, index=False) writes (its defaults: QUOTE_MINIMAL with quotechar
    '"', doublequote, lineterminator "\\n"): a field is quoted when it holds the separator, a quote or "\\n"."""
    def field(text):
        needs = separator in text or '"' in text or "\n" in text
        return '"' + text.replace('"', '""') + '"' if needs else text
    return "".join(separator.join(field(text) for text in row) + "\n" for row in [("anchor", "positive"), *rows])


def csv_module(rows, dialect: str) -> str:
    out = io.StringIO()
    csv.writer(out, dialect=dialect).writerows([("anchor", "positive"), *rows])
    return out.getvalue()


def assert_reads_back(path, text: str, rows) -> None:
    path.write_text(text, encoding="utf-8", newline="")
    assert [(r["anchor"], r["positive"]) for r in data.read_dataset(path).rows] == rows
    assert table_reader(path, "anchor", "positive") == rows


def tsv_rows(rows) -> bool:
    """A TSV field cannot hold a tab (every tab separates) or a line break (a record is a line)."""
    return not any(c in text for row in rows for text in row for c in "\t\n")


@PROPERTY
@given(rows=ROWS)
def test_csv_module_output_reads_back(tmp_path_factory, rows):
    folder = tmp_path_factory.getbasetemp()
    assert_reads_back(folder / "p.csv", csv_module(rows, "excel"), rows)
    if tsv_rows(rows):
        assert_reads_back(folder / "p.tsv", csv_module(rows, "excel-tab"), rows)


@PROPERTY
@given(rows=ROWS)
def test_pandas_style_output_reads_back(tmp_path_factory, rows):
    # "x\r" + "\n" is a line ending "\r\n": a text ending in "\r" at the end of a line written with bare "\n" line
    # ends, unquoted (pandas quotes no "\r"), cannot be told from it. csv's own writer quotes it.
    assume(not any(row[-1].endswith("\r") for row in rows))
    folder = tmp_path_factory.getbasetemp()
    assert_reads_back(folder / "q.csv", pandas_style(rows, ","), rows)
    if tsv_rows(rows):
        assert_reads_back(folder / "q.tsv", pandas_style(rows, "\t"), rows)


@PROPERTY
@given(rows=ROWS, ensure_ascii=st.booleans())
def test_json_lines_read_back(tmp_path_factory, rows, ensure_ascii):
    path = tmp_path_factory.getbasetemp() / "r.jsonl"
    path.write_text("".join(json.dumps({"anchor": a, "positive": p}, ensure_ascii=ensure_ascii) + "\n"
                            for a, p in rows), encoding="utf-8")
    assert [(r["anchor"], r["positive"]) for r in data.read_dataset(path).rows] == rows
    assert [(text, record_id) for _, _, text, record_id in
            corpus.Reader(path, field="anchor", id_field="positive").records()] == rows


@PROPERTY
@given(rows=st.lists(st.tuples(TEXT, TEXT), min_size=1, max_size=5))
def test_minilm_tsv_writer_reads_back(tmp_path_factory, rows):
    assume(tsv_rows(rows))
    path = tmp_path_factory.getbasetemp() / "w.tsv"
    assert_reads_back(path, "anchor\tpositive\n" + "".join(data.write_tsv_line(row) for row in rows), rows)


def test_pandas_style_is_what_pandas_writes():
    """The stand-in above against pandas itself, where it is installed (it is not a dependency)."""
    pandas = pytest.importorskip("pandas")
    rows = [(text, f"{text}!") for text in TRICKY if "\n" not in text]
    frame = pandas.DataFrame(rows, columns=["anchor", "positive"])
    for separator in (",", "\t"):
        assert frame.to_csv(sep=separator, index=False) == pandas_style(rows, separator)
