"""Readers, benchmark loaders and batch samplers."""

import json

import pytest

from minilm import data

from conftest import shared_data


def test_stsb_splits():
    stsb = shared_data("stsb")
    sizes = {split: len(data.load_stsb(stsb, split)) for split in ("train", "dev", "test")}
    assert sizes == {"train": 5749, "dev": 1500, "test": 1379}
    rows = data.load_stsb(stsb, "train")
    assert all(0 <= row["score"] <= 1 for row in rows)
    assert all(row["sentence1"] and row["sentence2"] for row in rows)


def test_sick_splits_and_labels():
    sick = shared_data("sick", "SICK.tsv")
    train, trial, test = (data.load_sick(sick, split) for split in ("train", "trial", "test"))
    assert (len(train), len(trial), len(test)) == (4439, 495, 4906)
    assert {row["label"] for row in train} == {0, 1, 2}
    assert all(0 <= row["score"] <= 1 for row in test)


def test_reads_tsv_csv_jsonl_with_aliases(tmp_path):
    (tmp_path / "a.tsv").write_text("sentence_0\tsentence_1\tlabel\nhello\tworld\t1\n\"quoted\" text\tb\t0\n")
    (tmp_path / "b.csv").write_text('sentence1,sentence2,score\n"a, with comma",b,0.5\n')
    (tmp_path / "c.jsonl").write_text(json.dumps({"premise": "p", "hypothesis": "h", "label": "neutral"}) + "\n")
    tsv = data.read_dataset(tmp_path / "a.tsv")
    assert tsv.column_names == ["sentence1", "sentence2", "label"]
    assert tsv.rows[1] == {"sentence1": '"quoted" text', "sentence2": "b", "label": 0}
    assert data.read_dataset(tmp_path / "b.csv").rows == [{"sentence1": "a, with comma", "sentence2": "b", "score": 0.5}]
    assert data.read_dataset(tmp_path / "c.jsonl").rows[0]["label"] == 1


@pytest.mark.parametrize("name, content, message", [
    ("empty.tsv", "", "empty"),
    ("short.tsv", "sentence1\tsentence2\tscore\na\tb\n", ":2: 2 fields, the header has 3"),
    ("score.tsv", "sentence1\tsentence2\tscore\na\tb\t0.1\nc\td\thigh\n", ":3: score 'high' is not a number"),
    ("label.csv", "premise,hypothesis,label\na,b,7\n", ":2: label '7' is outside 0..2"),
    ("broken.jsonl", '{"anchor": "a", "positive": "b"}\n{"anchor": \n', ":2: not valid JSON"),
    ("missing.jsonl", '{"anchor": "a", "positive": "b"}\n{"anchor": "c"}\n', ":2: missing column(s) ['positive']"),
])
def test_malformed_input_names_file_and_line(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(data.DataError) as error:
        data.read_dataset(path, num_labels=3)
    assert str(path) in str(error.value) and message in str(error.value)


def test_undecodable_bytes_name_the_line(tmp_path):
    path = tmp_path / "latin1.tsv"
    path.write_bytes("sentence1\tsentence2\tscore\ncafé\tb\t1\n".encode("latin-1"))
    with pytest.raises(data.DataError, match=r"latin1.tsv:2: bytes that are not UTF-8"):
        data.read_dataset(path)


def test_no_duplicates_sampler_covers_every_row_once_without_repeats():
    texts = [f"t{i % 37}" for i in range(300)]  # many duplicate texts
    rows = [{"anchor": texts[i], "positive": f"p{i}"} for i in range(300)]
    sampler = data.NoDuplicatesBatchSampler(rows, 16, seed=3, columns=["anchor", "positive"])
    for epoch in range(2):
        sampler.set_epoch(epoch)
        batches = list(sampler)
        assert sorted(i for batch in batches for i in batch) == list(range(300))
        for batch in batches:
            anchors = [rows[i]["anchor"] for i in batch]
            assert len(anchors) == len(set(anchors))
    sampler.set_epoch(0)
    first = list(sampler)
    assert first == list(data.NoDuplicatesBatchSampler(rows, 16, seed=3, columns=["anchor", "positive"]))
    sampler.set_epoch(1)
    assert list(sampler) != first


def test_random_sampler_and_round_robin():
    a = data.RandomBatchSampler([{}] * 10, 4, seed=1)
    b = data.RandomBatchSampler([{}] * 30, 4, seed=1)
    assert [len(batch) for batch in a] == [4, 4, 2] and len(a) == 3
    batches = list(data.RoundRobinBatches([a, b]))
    assert [dataset for dataset, _ in batches] == [0, 1, 0, 1, 0, 1]


def test_collate_packs_each_column():
    from minilm.packing import pack

    rows = [{"sentence1": "a b", "sentence2": "c", "score": 0.5}, {"sentence1": "d", "sentence2": "e f g", "score": 1.0}]
    fake_tokenize = lambda texts: pack([[len(word) for word in text.split()] for text in texts])  # noqa: E731
    features, labels = data.collate(rows, ["sentence1", "sentence2"], "score", fake_tokenize)
    assert features[0]["cu_seqlens"].tolist() == [0, 2, 3] and features[1]["cu_seqlens"].tolist() == [0, 1, 4]
    assert labels.tolist() == [0.5, 1.0]


def test_a_byte_order_mark_is_dropped(tmp_path):
    path = tmp_path / "excel.tsv"
    path.write_bytes("\ufeffsentence1\tsentence2\tscore\na\tb\t0.5\n".encode("utf-8"))
    dataset = data.read_dataset(path)
    assert dataset.column_names == ["sentence1", "sentence2", "score"]
    assert dataset.rows == [{"sentence1": "a", "sentence2": "b", "score": 0.5}]


def test_tsv_quoted_fields_are_read_as_quoted(tmp_path):
    """A field wholly in quotes loses them ("" is one quote); quotes inside a field are text."""
    path = tmp_path / "quoted.tsv"
    path.write_text('"sentence1"\t"sentence2"\t"score"\n"He said ""hi"""\t"b"\t"0.5"\n"quoted" text\tx\t1\n')
    dataset = data.read_dataset(path)
    assert dataset.rows == [{"sentence1": 'He said "hi"', "sentence2": "b", "score": 0.5},
                            {"sentence1": '"quoted" text', "sentence2": "x", "score": 1.0}]
    assert dataset.lines == [2, 3]


def test_samplers_leave_out_batches_below_their_minimum():
    rows = [{"anchor": f"a{i}", "positive": f"p{i}"} for i in range(9)]
    sampler = data.NoDuplicatesBatchSampler(rows, 4, seed=0, columns=["anchor", "positive"], min_size=2)
    assert [len(batch) for batch in sampler] == [4, 4] and len(sampler) == 2  # the row left over is not a batch
    duplicates = [{"anchor": "same", "positive": "same too"}] * 5
    assert list(data.NoDuplicatesBatchSampler(duplicates, 4, columns=["anchor", "positive"], min_size=2)) == []


def test_fields_no_loss_reads_as_text_are_kept_as_they_are(tmp_path):
    """An id or other metadata (a number, null) beside the text columns is no error; text columns are checked."""
    path = tmp_path / "d.jsonl"
    path.write_text('{"id": 5, "anchor": "a", "positive": "b", "meta": null}\n'
                    '{"id": 6, "anchor": "c", "positive": "d", "meta": {"k": 1}}\n')
    rows = data.read_dataset(path).rows
    assert rows == [{"id": 5, "anchor": "a", "positive": "b", "meta": None},
                    {"id": 6, "anchor": "c", "positive": "d", "meta": {"k": 1}}]
    path.write_text('{"anchor": "a", "positive": 7}\n')
    with pytest.raises(data.DataError, match="field 'positive' is int 7"):
        data.read_dataset(path)


def test_labels_written_as_decimals_or_capitalized_names_are_the_classes_they_mean(tmp_path):
    path = tmp_path / "nli.tsv"
    path.write_text("premise\thypothesis\tlabel\na\tb\t1.0\nc\td\tEntailment\ne\tf\tNEUTRAL\ng\th\t2\n")
    assert [row["label"] for row in data.read_dataset(path, 3).rows] == [1, 0, 1, 2]
    path.write_text("premise\thypothesis\tlabel\na\tb\tfoo\n")
    with pytest.raises(data.DataError, match=r"nli.tsv:2: label 'foo' is outside 0..2 \(a name .* class 3\)"):
        data.read_dataset(path, 3)
    path.write_text("premise\thypothesis\tlabel\na\tb\t1.5\n")
    with pytest.raises(data.DataError, match="label '1.5' is not an integer"):
        data.read_dataset(path, 3)


def test_a_damaged_or_missing_file_is_one_error_naming_it(tmp_path):
    """numbered_lines, under every reader: a truncated gzip file, a folder, a missing file."""
    import gzip

    path = tmp_path / "snli_1.0_dev.jsonl.gz"
    path.write_bytes(gzip.compress(b'{"sentence1": "A", "sentence2": "B", "gold_label": "neutral"}\n' * 50)[:-20])
    with pytest.raises(data.DataError, match=r"snli_1.0_dev.jsonl.gz:\d+: cannot read it"):
        data.load_snli(path)
    with pytest.raises(data.DataError, match="is a folder"):
        data.read_dataset(tmp_path)
    with pytest.raises(data.DataError, match="nothing.tsv: no such file"):
        data.read_dataset(tmp_path / "nothing.tsv")
