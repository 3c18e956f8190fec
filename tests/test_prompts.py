"""Prompts: encode(prompt=, prompt_name=), encode_query / encode_document and the default prompt give
sentence-transformers' embeddings on a saved model; the prompt counts against max_seq_length; the fields of
config_sentence_transformers.json are checked as input; training prompts go before tokenization in collate and
become the trained model's prompts; the evaluators encode with them as sentence-transformers' do."""

import json
import logging
import shutil

import numpy as np
import pytest
import torch

import minilm
from minilm import data, evaluation
from minilm.errors import InputError
from losses import LOSSES

SENTENCES = ["What do cells do when they divide?", "", "Ünïcödé and numbers 12345", "word " * 300]
PROMPTS = {"query": "query: ", "document": "passage: ", "sts": "similar: ", "empty": ""}


@pytest.fixture(scope="module")
def prompted(model_dir, tmp_path_factory):
    """The real model with prompts and a default prompt, saved; and sentence-transformers' load of it."""
    st = pytest.importorskip("sentence_transformers")
    model = minilm.load(str(model_dir), device="cpu")
    model.prompts, model.default_prompt_name = dict(PROMPTS), "sts"
    out = model.save(tmp_path_factory.mktemp("prompted") / "model")
    return model, out, st.SentenceTransformer(str(out), device="cpu")


@pytest.fixture
def tiny(tiny_model_dir):
    return minilm.load(str(tiny_model_dir), device="cpu")


def test_saved_prompts_give_sentence_transformers_embeddings(prompted):
    model, out, reference = prompted
    assert reference.default_prompt_name == "sts" and PROMPTS.items() <= reference.prompts.items()
    for options in ({}, {"prompt_name": "query"}, {"prompt_name": "empty"}, {"prompt": ""}, {"prompt": "x: "}):
        ours, theirs = model.encode(SENTENCES, **options), reference.encode(SENTENCES, **options)
        assert np.abs(ours - theirs).max() < 1e-5, options
    assert np.abs(model.encode_query(SENTENCES) - reference.encode_query(SENTENCES)).max() < 1e-5
    assert np.abs(model.encode_document(SENTENCES) - reference.encode_document(SENTENCES)).max() < 1e-5
    # the prompts change the embeddings (the test above could not pass by ignoring them)
    assert np.abs(model.encode(SENTENCES[:1], prompt="") - model.encode(SENTENCES[:1])).max() > 1e-2
    reloaded = minilm.load(str(out), device="cpu")
    assert reloaded.prompts == PROMPTS and reloaded.default_prompt_name == "sts"
    saved = json.loads((out / "config_sentence_transformers.json").read_text())
    assert saved["prompts"] == PROMPTS and saved["default_prompt_name"] == "sts" and "truncate_dim" not in saved


@pytest.mark.parametrize("prompts, default", [({"query": "q: ", "passage": "p: "}, None),
                                              ({"sts": "similar: "}, "sts")])
def test_encode_query_and_document_of_a_saved_model_equal_sentence_transformers(tiny_model_dir, tmp_path, prompts,
                                                                                default):
    """A model without a "document" prompt (here "passage") or without a "query" one (here the default prompt's)
    once saved its prompts as they were: sentence-transformers 6 gives it empty "query" and "document" prompts, so
    its encode_document ignored "passage" and its encode_query the default prompt, where minilm used them."""
    st = pytest.importorskip("sentence_transformers")
    model = minilm.load(str(tiny_model_dir), device="cpu")
    model.prompts, model.default_prompt_name = dict(prompts), default
    model.save(tmp_path)
    reference, reloaded = st.SentenceTransformer(str(tmp_path), device="cpu"), minilm.load(str(tmp_path), device="cpu")
    for ours in (model, reloaded):
        assert np.abs(ours.encode_query(SENTENCES) - reference.encode_query(SENTENCES)).max() < 1e-5
        assert np.abs(ours.encode_document(SENTENCES) - reference.encode_document(SENTENCES)).max() < 1e-5
        assert np.abs(ours.encode(SENTENCES) - reference.encode(SENTENCES)).max() < 1e-5
    assert prompts.items() <= reloaded.prompts.items() and reloaded.default_prompt_name == default
    # the prompts change the embeddings (the test could not pass by ignoring them)
    assert np.abs(model.encode_document(SENTENCES[:1]) - model.encode(SENTENCES[:1], prompt="")).max() > 1e-3


def test_a_model_saved_by_sentence_transformers_loads_its_prompts(prompted, tmp_path):
    """sentence-transformers adds empty "query" and "document" prompts to every model it saves."""
    _, _, reference = prompted
    reference.save(str(tmp_path))
    loaded = minilm.load(str(tmp_path), device="cpu")
    assert loaded.prompts == reference.prompts and loaded.default_prompt_name == "sts"


def test_the_prompt_counts_against_max_seq_length(tiny):
    """The prompt is put before the text and then tokenized: it takes word pieces from the text."""
    tiny.max_seq_length = 8  # [CLS] + 6 word pieces + [SEP]
    with_prompt = tiny.encode("one two three four five six seven eight", prompt="query : ")
    assert np.array_equal(with_prompt, tiny.encode("query : one two three four", prompt=""))  # 2 + 4 pieces
    tiny.max_seq_length = 10
    assert not np.array_equal(with_prompt, tiny.encode("query : one two three four five six", prompt=""))


def test_which_prompt_encode_uses(tiny, caplog, tmp_path):
    plain = lambda texts: tiny.encode(texts, prompt="")  # noqa: E731
    texts = ["a dog runs", "the market fell"]
    tiny.prompts = {"query": "q: ", "passage": "p: ", "corpus": "c: ", "all": "a: "}
    assert np.array_equal(tiny.encode(texts), plain(texts))  # no default prompt: none
    tiny.default_prompt_name = "all"
    assert np.array_equal(tiny.encode(texts), plain(["a: " + t for t in texts]))
    assert np.array_equal(tiny.encode(texts, prompt_name="query"), plain(["q: " + t for t in texts]))
    assert np.array_equal(tiny.encode_query(texts), plain(["q: " + t for t in texts]))
    assert np.array_equal(tiny.encode_document(texts), plain(["p: " + t for t in texts]))  # passage before corpus
    del tiny.prompts["passage"]
    assert np.array_equal(tiny.encode_document(texts), plain(["c: " + t for t in texts]))
    del tiny.prompts["corpus"]
    assert np.array_equal(tiny.encode_document(texts), plain(["a: " + t for t in texts]))  # the default
    with caplog.at_level(logging.WARNING, logger="minilm.model"):
        both = tiny.encode(texts, prompt="x: ", prompt_name="query")
    assert np.array_equal(both, plain(["x: " + t for t in texts])) and "prompt_name 'query' is ignored" in caplog.text
    with pytest.raises(InputError, match=r"^prompt_name 'passage' is not one of the model's prompts \('query', "
                                         r"'all'\)$"):
        tiny.encode(texts, prompt_name="passage")
    with pytest.raises(InputError, match="prompt must be a string"):
        tiny.encode(texts, prompt=3)
    tiny.default_prompt_name = "gone"
    with pytest.raises(InputError, match="'default_prompt_name' is 'gone'"):
        tiny.encode(texts)
    with pytest.raises(InputError, match="'default_prompt_name' is 'gone'"):
        tiny.save(tmp_path / "never")
    assert not (tmp_path / "never").exists()  # refused before writing anything


CONFIG_CASES = {  # config_sentence_transformers.json edit -> fragment of the one-line error
    "prompts-a-list": (lambda c: c.update(prompts=["query: "]), "field 'prompts' is [\"query: \"]"),
    "prompt-a-number": (lambda c: c.update(prompts={"query": 5}), "field 'prompts' is {\"query\": 5}"),
    "default-not-a-name": (lambda c: c.update(prompts={"query": "q: "}, default_prompt_name="document"),
                           "field 'default_prompt_name' is 'document'; expected null or one of the prompts' names "
                           "('query')"),
    "default-a-number": (lambda c: c.update(default_prompt_name=1), "field 'default_prompt_name' is 1"),
}


@pytest.mark.parametrize("case", CONFIG_CASES)
def test_bad_prompt_fields_are_refused_naming_them(tiny_model_dir, tmp_path, case):
    change, fragment = CONFIG_CASES[case]
    shutil.copytree(tiny_model_dir, tmp_path / "m")
    path = tmp_path / "m" / "config_sentence_transformers.json"
    config = json.loads(path.read_text())
    change(config)
    path.write_text(json.dumps(config))
    with pytest.raises(InputError) as error:
        minilm.load(str(tmp_path / "m"), device="cpu")
    assert str(path) in str(error.value) and fragment in str(error.value) and "\n" not in str(error.value)


def test_pooling_that_leaves_out_the_prompt_is_refused(tiny_model_dir, tmp_path):
    """sentence-transformers' Pooling(include_prompt=False) pools without the prompt's tokens; minilm pools every
    token, so it refuses such a model rather than give other embeddings."""
    shutil.copytree(tiny_model_dir, tmp_path / "m")
    path = tmp_path / "m" / "1_Pooling" / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "include_prompt": False}))
    with pytest.raises(InputError, match="field 'include_prompt' is False; minilm pools every token"):
        minilm.load(str(tmp_path / "m"), device="cpu")


# --- training ---------------------------------------------------------------------------------------------------
def test_collate_puts_each_column_prompt_before_tokenization(tiny):
    rows = [{"anchor": "how do cells divide", "positive": "mitosis splits a cell", "negative": "stocks fell"},
            {"anchor": "a b", "positive": "c d", "negative": "e f"}]
    columns = ["anchor", "positive", "negative"]
    features, labels = data.collate(rows, columns, None, tiny.tokenize, {"anchor": "query: ", "positive": "passage: "})
    expected = [tiny.tokenize([prefix + row[column] for row in rows])
                for column, prefix in zip(columns, ("query: ", "passage: ", ""))]
    for got, want in zip(features, expected):
        assert torch.equal(got["input_ids"], want["input_ids"]) and torch.equal(got["cu_seqlens"], want["cu_seqlens"])
    assert labels is None
    features, _ = data.collate(rows, columns, None, tiny.tokenize, "x: ")  # one string: every text column
    plain, _ = data.collate([{c: "x: " + row[c] for c in columns} for row in rows], columns, None, tiny.tokenize)
    assert all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(features, plain))


def test_parse_prompts_checks_columns_against_the_loss():
    mnrl, cosine = LOSSES["mnrl"], LOSSES["cosine"]
    assert data.parse_prompts('{"anchor": "query: ", "negative_2": "p: "}', mnrl) == {"anchor": "query: ",
                                                                                     "negative_2": "p: "}
    assert data.parse_prompts("query: ", mnrl) == "query: "
    assert data.parse_prompts({"premise": "a: "}, cosine) == {"premise": "a: "}  # a recipe's JSON value
    assert data.parse_prompts(None, mnrl) is None and data.parse_prompts("", mnrl) is None
    # a JSON string is the prompt between its quotes; text that only starts like JSON is the prompt as written
    assert data.parse_prompts('"query: "', mnrl) == "query: " and data.parse_prompts("[INST] ", mnrl) == "[INST] "
    for value, loss, message in (
            ('{"query": "q: "}', mnrl, "--prompts: column 'query' is not one the MultipleNegativesRankingLoss loss "
                                       "reads (it reads anchor, positive, negative...;"),
            ({"score": "s: "}, cosine, "column 'score' is not one the CosineSimilarityLoss loss reads (it reads "
                                       "hypothesis, premise, sentence1, sentence2;"),
            ('{"anchor": 5}', mnrl, "--prompts: the prompt of 'anchor' is 5; expected a string"),
            ('{"anchor": "q: "', mnrl, "--prompts '{\"anchor\": \"q: \"': not valid JSON"),
            (["q: "], mnrl, "--prompts: expected a prompt or an object of column -> prompt, not list"),
            ('["query: ", "passage: "]', mnrl, "--prompts '[\"query: \", \"passage: \"]': a JSON array; expected "
                                               "one prompt for every column, or an object of column -> prompt")):
        with pytest.raises(InputError) as error:
            data.parse_prompts(value, loss)
        assert message in str(error.value) and "\n" not in str(error.value), str(error.value)


def test_training_prompts_become_the_models_prompts():
    assert data.model_prompts({"anchor": "query: ", "positive": "passage: "}, ["anchor", "positive", "negative"]) == (
        {"query": "query: ", "document": "passage: ", "anchor": "query: ", "positive": "passage: "}, None)
    assert data.model_prompts({"sentence2": "b: "}, ["sentence1", "sentence2"]) == (
        {"query": "", "document": "b: ", "sentence2": "b: "}, None)
    # one prompt for every column: also the default, so that plain encode uses it (STS)
    assert data.model_prompts("s: ", ["sentence1", "sentence2"]) == (
        {"query": "s: ", "document": "s: ", "sentence1": "s: ", "sentence2": "s: "}, "query")


def test_the_model_card_names_the_prompts(tiny):
    from minilm import model_card

    tiny.prompts, tiny.default_prompt_name = {"query": "query: ", "document": "", "anchor": "<b>q</b>"}, "query"
    line = model_card._prompts_line(tiny)
    assert "<code>query</code>: <code>&quot;query: &quot;</code>" in line and "<code>document</code>" not in line
    assert "&lt;b&gt;q&lt;/b&gt;" in line and "<b>" not in line and "default: <code>query</code>" in line
    tiny.prompts, tiny.default_prompt_name = {"query": ""}, None
    assert model_card._prompts_line(tiny) == ""


# --- evaluation -------------------------------------------------------------------------------------------------
def test_evaluators_encode_with_the_models_prompts_as_sentence_transformers(prompted):
    """Retrieval: queries with the "query" prompt, documents with the "document" prompt; pairs: the default prompt;
    explicit query_prompt / corpus_prompt win. Metrics equal sentence-transformers' evaluators on its load."""
    from sentence_transformers.sentence_transformer.evaluation import (EmbeddingSimilarityEvaluator,
                                                                       InformationRetrievalEvaluator)

    model, _, reference = prompted
    # Word soup judged at random: every rank moves with the prompts (sensible data would rank alike with or without)
    rng = np.random.default_rng(0)
    words = "cell divides market falls rain city protein shape cat sleeps river music data question".split()
    soup = lambda: " ".join(rng.choice(words, size=int(rng.integers(2, 9))))  # noqa: E731
    docs = {f"d{i}": soup() for i in range(40)}
    queries = {f"q{i}": soup() for i in range(12)}
    relevant = {query: {f"d{j}" for j in rng.choice(40, size=2, replace=False)} for query in queries}
    for options in ({}, {"query_prompt": "", "corpus_prompt": "x: "}):
        ours = evaluation.InformationRetrievalEvaluator(queries, docs, relevant, **options)(model)
        theirs = InformationRetrievalEvaluator(queries, docs, relevant, name="x", write_csv=False,
                                               **options)(reference)
        for key, value in ours.items():
            assert abs(value - theirs[f"x_{key}"]) < 1e-6, (options, key)
    s1, s2 = ["A man eats.", "A dog runs.", "It rains."], ["Someone is eating.", "A cat sleeps.", "Sunny day."]
    ours = evaluation.EmbeddingSimilarityEvaluator(s1, s2, [0.9, 0.2, 0.1])(model)
    theirs = EmbeddingSimilarityEvaluator(s1, s2, [0.9, 0.2, 0.1], name="x", write_csv=False)(reference)
    assert abs(ours["pearson_cosine"] - theirs["x_pearson_cosine"]) < 1e-6
