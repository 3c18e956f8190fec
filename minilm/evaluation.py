"""Evaluators: embed an evaluation set with a model, then score it. Used by train.py and eval.py.

Each evaluator is called as `evaluator(model) -> {metric: value}`; the maths lives in a plain function over
embeddings (`similarity_metrics`, `binary_metrics`, `retrieval_metrics`) so it can be tested without a model.
Metric names and definitions follow sentence-transformers' evaluators, so numbers compare one to one.
"""

import json
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from minilm import data
from minilm.model import check_truncate_dim, pair_features

# eval.py's --task names and train.py's --eval-task names.
TASKS = ("stsb", "stsb-binary", "sick", "nli", "pairs", "binary", "retrieval")


def rank_average_ties(values: np.ndarray) -> np.ndarray:
    """Ranks 1..n, tied values sharing the average of their ranks (what Spearman's rho needs)."""
    order = np.argsort(values, kind="stable")
    sorted_values = values[order]
    ranks = np.empty(len(values), dtype=np.float64)
    start = 0
    while start < len(values):
        end = start
        while end + 1 < len(values) and sorted_values[end + 1] == sorted_values[start]:
            end += 1
        ranks[order[start:end + 1]] = (start + end) / 2 + 1
        start = end + 1
    return ranks


def pearson(x: np.ndarray, y: np.ndarray) -> float:
    x, y = x - x.mean(), y - y.mean()
    return float((x * y).sum() / np.sqrt((x * x).sum() * (y * y).sum()))


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    return pearson(rank_average_ties(x), rank_average_ties(y))


def similarity_metrics(embeddings1: torch.Tensor, embeddings2: torch.Tensor, scores) -> dict:
    """Pearson and Spearman correlation between pairwise cosine similarity and gold scores."""
    cosine = F.cosine_similarity(embeddings1.double(), embeddings2.double(), dim=-1).numpy()
    gold = np.asarray(scores, dtype=np.float64)
    return {"pearson_cosine": pearson(cosine, gold), "spearman_cosine": spearman(cosine, gold)}


def _score_groups(scores: np.ndarray, labels: np.ndarray):
    """Pairs sorted by score, high first; yields (score, next score or None, positives so far, seen so far) at
    the end of every group of equal scores (a threshold can only fall between groups)."""
    order = np.argsort(-scores, kind="stable")
    scores, labels = scores[order], labels[order]
    positives = 0
    for i in range(len(scores)):
        positives += labels[i]
        is_last = i == len(scores) - 1
        if not is_last and scores[i + 1] == scores[i]:
            continue
        yield scores[i], None if is_last else scores[i + 1], positives, i + 1


def _between(score, next_score):
    """A threshold between two score groups; the midpoint unless rounding puts it on the next group."""
    if next_score is None:
        return score
    middle = (score + next_score) / 2
    return score if middle == next_score else middle


def binary_metrics(embeddings1: torch.Tensor, embeddings2: torch.Tensor, labels) -> dict:
    """Cosine accuracy/F1/precision/recall at their best thresholds, average precision and MCC.

    A pair is predicted similar when its cosine is >= the threshold; thresholds are searched over the midpoints
    between consecutive distinct scores.
    """
    scores = F.cosine_similarity(embeddings1, embeddings2, dim=-1).numpy()
    labels = np.asarray(labels, dtype=np.int64)
    total, total_positives = len(labels), int(labels.sum())
    # Accuracy: start from "everything dissimilar", the threshold just above the highest score.
    best_accuracy = (total - total_positives) / total
    accuracy_threshold = float(np.nextafter(scores.max(), np.inf, dtype=np.result_type(scores.dtype, np.float16)))
    best_f1 = best_precision = best_recall = 0.0
    f1_threshold = 0.0
    average_precision, previous_recall = 0.0, 0.0
    for score, next_score, positives, seen in _score_groups(scores, labels):
        accuracy = (positives + (total - seen) - (total_positives - positives)) / total
        if accuracy > best_accuracy:
            best_accuracy, accuracy_threshold = accuracy, float(_between(score, next_score))
        if positives > 0:
            precision, recall = positives / seen, positives / total_positives
            f1 = 2 * precision * recall / (precision + recall)
            if f1 > best_f1:
                best_f1, best_precision, best_recall = f1, precision, recall
                f1_threshold = float(_between(score, next_score))
            average_precision += (recall - previous_recall) * precision
            previous_recall = recall
    predicted = scores >= f1_threshold
    return {"cosine_accuracy": best_accuracy, "cosine_accuracy_threshold": accuracy_threshold,
            "cosine_f1": best_f1, "cosine_f1_threshold": f1_threshold, "cosine_precision": best_precision,
            "cosine_recall": best_recall, "cosine_ap": average_precision,
            "cosine_mcc": matthews(labels.astype(bool), predicted)}


def matthews(truth: np.ndarray, predicted: np.ndarray) -> float:
    tp, tn = float(np.sum(truth & predicted)), float(np.sum(~truth & ~predicted))
    fp, fn = float(np.sum(~truth & predicted)), float(np.sum(truth & ~predicted))
    denominator = np.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    return 0.0 if denominator == 0 else (tp * tn - fp * fn) / denominator


RETRIEVAL_KS = {"accuracy": (1, 3, 5, 10), "precision": (1, 3, 5, 10), "recall": (1, 3, 5, 10), "mrr": (10,),
                "ndcg": (10,), "map": (100,)}


def ranked_hits(query_embeddings, corpus_embeddings, depth: int, query_chunk: int = 1024,
                corpus_chunk: int = 65536, skip=None) -> list:
    """The `depth` best corpus indices of each query by cosine, best first; equal scores rank the lower corpus
    index first (sentence-transformers' evaluator: corpus ordered by id, ties by id). skip: None, or for each
    query one corpus index never to return (-1: none), e.g. the query itself when queries are in the corpus.

    Uses minilm.search (exact, chunked: memory query_chunk x (corpus_chunk + depth), never query x corpus).
    search breaks ties arbitrarily, so it fetches one extra hit: a query whose depth-th and (depth+1)-th
    scores are equal shares its last place with documents search may have dropped, and is ranked again alone
    over the whole corpus (one row of scores, in corpus chunks; rare outside tests)."""
    from minilm.similarity_search import search

    corpus_size = corpus_embeddings.shape[0]
    skip = [-1] * query_embeddings.shape[0] if skip is None else list(skip)
    k = min(depth, corpus_size - (1 if any(s >= 0 for s in skip) and corpus_size > 1 else 0))
    fetch = min(k + 1 + (1 if any(s >= 0 for s in skip) else 0), corpus_size)
    indices, scores = search(query_embeddings, corpus_embeddings, top_k=fetch, query_chunk=query_chunk,
                             corpus_chunk=corpus_chunk)
    indices, scores = indices.numpy(), scores.numpy()
    hits = []
    for row in range(indices.shape[0]):
        kept = indices[row] != skip[row]
        row_indices, row_scores = indices[row][kept], scores[row][kept]
        if len(row_scores) > k and row_scores[k - 1] == row_scores[k]:
            hits.append(_ranked_alone(query_embeddings[row:row + 1], corpus_embeddings, k, corpus_chunk, skip[row]))
        else:
            order = np.lexsort((row_indices, -row_scores))[:k]  # by score, high first, then by index
            hits.append(row_indices[order].tolist())
    return hits


def _ranked_alone(query, corpus_embeddings, k: int, corpus_chunk: int, skip: int) -> list:
    """One query against every corpus row ([corpus_size] scores), sorted by (-score, index)."""
    query = F.normalize(torch.as_tensor(np.asarray(query), dtype=torch.float32), dim=-1)
    parts = []
    for start in range(0, corpus_embeddings.shape[0], corpus_chunk):
        chunk = torch.as_tensor(np.asarray(corpus_embeddings[start:start + corpus_chunk]), dtype=torch.float32)
        parts.append((query @ F.normalize(chunk, dim=-1).T)[0])
    scores = torch.cat(parts).numpy()
    order = np.lexsort((np.arange(len(scores)), -scores))
    return [int(i) for i in order if i != skip][:k]


def retrieval_metrics(query_embeddings: torch.Tensor, corpus_embeddings: torch.Tensor, relevant: list,
                      query_chunk: int = 1024, corpus_chunk: int = 65536, skip=None) -> dict:
    """Rank the corpus for each query by cosine similarity (ties: lower corpus index first).

    relevant: for each query, the set of corpus indices that answer it (relevance is binary, as in
    sentence-transformers' evaluator). Returns accuracy@k, precision@k, recall@k, mrr@10, ndcg@10 and map@100,
    averaged over queries, keyed like "cosine_ndcg@10". Memory and skip: see ranked_hits.
    """
    depth = max(max(ks) for ks in RETRIEVAL_KS.values())
    totals = {f"cosine_{name}@{k}": 0.0 for name, ks in RETRIEVAL_KS.items() for k in ks}
    top = ranked_hits(query_embeddings, corpus_embeddings, depth, query_chunk, corpus_chunk, skip)
    for hits, wanted in zip(top, relevant):
        found = [hit in wanted for hit in hits]
        for k in RETRIEVAL_KS["accuracy"]:
            totals[f"cosine_accuracy@{k}"] += any(found[:k])
        for k in RETRIEVAL_KS["precision"]:
            totals[f"cosine_precision@{k}"] += sum(found[:k]) / k
            totals[f"cosine_recall@{k}"] += sum(found[:k]) / len(wanted)
        for k in RETRIEVAL_KS["mrr"]:
            totals[f"cosine_mrr@{k}"] += next((1 / (rank + 1) for rank, hit in enumerate(found[:k]) if hit), 0)
        for k in RETRIEVAL_KS["ndcg"]:
            dcg = sum(1 / np.log2(rank + 2) for rank, hit in enumerate(found[:k]) if hit)
            ideal = sum(1 / np.log2(rank + 2) for rank in range(min(len(wanted), k)))
            totals[f"cosine_ndcg@{k}"] += dcg / ideal
        for k in RETRIEVAL_KS["map"]:
            correct, precision_sum = 0, 0.0
            for rank, hit in enumerate(found[:k]):
                if hit:
                    correct += 1
                    precision_sum += correct / (rank + 1)
            totals[f"cosine_map@{k}"] += precision_sum / min(k, len(wanted))
    return {key: value / len(relevant) for key, value in totals.items()}


# --- BEIR layout: corpus.jsonl, queries.jsonl, qrels/<split>.tsv -------------------------------------------------

def _jsonl_records(path: Path, what: str):
    """(line number, dict) of a JSONL file whose records need string `_id` and `text` fields."""
    if not path.is_file():
        raise data.DataError(f"{path}: no such file (a BEIR folder holds corpus.jsonl, queries.jsonl and "
                             f"qrels/<split>.tsv)")
    for number, line in data.numbered_lines(path):
        if not line.strip():
            continue
        try:
            record = data.parse_json_line(line)
        except json.JSONDecodeError as error:
            raise data.DataError(f"{path}:{number}: not valid JSON ({error.msg})") from None
        if not isinstance(record, dict):
            raise data.DataError(f"{path}:{number}: expected a JSON object with _id and text, got "
                                 f"{type(record).__name__}")
        for field in ("_id", "text"):
            if field not in record:
                raise data.DataError(f"{path}:{number}: {what} without the field {field!r}")
        if not isinstance(record["text"], str) or not isinstance(record.get("title", ""), str):
            raise data.DataError(f"{path}:{number}: text and title must be strings")
        if not isinstance(record["_id"], (str, int)) or isinstance(record["_id"], bool):
            # as str(): null would be the id "None", 1.0 "1.0" (never qrels' "1"), a list its Python repr
            raise data.DataError(f"{path}:{number}: _id {json.dumps(record['_id'])[:40]} is not a string or a whole "
                                 "number")
        yield number, record


def read_corpus(path) -> dict:
    """corpus.jsonl -> {id: text}. The text embedded is title + " " + text, stripped (MTEB's and BEIR's
    choice), or the text alone when there is no title."""
    path, corpus = Path(path), {}
    for number, record in _jsonl_records(path, "a document"):
        doc_id = str(record["_id"])
        if doc_id in corpus:
            raise data.DataError(f"{path}:{number}: the _id {doc_id!r} appears twice")
        title = record.get("title")
        corpus[doc_id] = (title + " " + record["text"]).strip() if title is not None else record["text"].strip()
    if not corpus:
        raise data.DataError(f"{path}: the file is empty")
    return corpus


def read_queries(path) -> dict:
    """queries.jsonl -> {id: text}."""
    path, queries = Path(path), {}
    for number, record in _jsonl_records(path, "a query"):
        query_id = str(record["_id"])
        if query_id in queries:
            raise data.DataError(f"{path}:{number}: the _id {query_id!r} appears twice")
        queries[query_id] = record["text"]
    if not queries:  # else every qrels line is refused as naming a query "not in queries.jsonl"
        raise data.DataError(f"{path}: the file is empty")
    return queries


def read_qrels(path, queries: dict, corpus: dict) -> dict:
    """qrels/<split>.tsv (query-id, corpus-id, score; a header line; CRLF or LF) -> {query id: {corpus id:
    score}}, keeping only scores > 0 (0 means judged not relevant). Every id must resolve in queries/corpus."""
    path, relevant = Path(path), {}
    if not path.is_file():
        found = sorted(p.stem for p in path.parent.glob("*.tsv")) if path.parent.is_dir() else []
        raise data.DataError(f"{path}: no such file (splits found: {', '.join(found) or 'none'})")
    for number, line in data.numbered_lines(path):
        if not line.strip():
            continue
        fields = data.tsv_fields(line)
        if len(fields) != 3:
            raise data.DataError(f"{path}:{number}: {len(fields)} tab-separated fields; qrels lines are "
                                 f"query-id, corpus-id, score")
        query_id, doc_id, score = (field.strip() for field in fields)
        try:
            score = int(score)
        except ValueError:
            if number == 1 and not _is_number(score):  # the header line (query-id, corpus-id, score)
                continue
            raise data.DataError(f"{path}:{number}: score {score!r} is not a whole number") from None
        if query_id not in queries:
            raise data.DataError(f"{path}:{number}: query id {query_id!r} is not in queries.jsonl")
        if doc_id not in corpus:
            raise data.DataError(f"{path}:{number}: corpus id {doc_id!r} is not in corpus.jsonl")
        if score > 0:
            relevant.setdefault(query_id, {})[doc_id] = score
    return relevant


def _is_number(text: str) -> bool:
    """Whether a qrels score field is a number: line 1 is a header only when its score is not one, so that a
    header-less file's first judgement ("q1 d1 1.0") is refused like any other line, not skipped unseen."""
    try:
        float(text)
    except ValueError:
        return False
    return True


def load_beir(folder, split: str):
    """A BEIR-layout folder -> (queries {id: text}, corpus {id: text}, relevant {query id: {corpus id: grade}})."""
    folder = Path(folder)
    if not folder.is_dir():
        raise data.DataError(f"{folder}: not a folder (a BEIR folder holds corpus.jsonl, queries.jsonl and "
                             f"qrels/<split>.tsv)")
    corpus = read_corpus(folder / "corpus.jsonl")
    queries = read_queries(folder / "queries.jsonl")
    relevant = read_qrels(folder / "qrels" / f"{split}.tsv", queries, corpus)
    if not relevant:
        raise data.DataError(f"{folder / 'qrels' / f'{split}.tsv'}: no relevant (score > 0) judgement")
    return queries, corpus, relevant


def beir_pairs(folder, split: str) -> list:
    """Training rows {anchor: query text, positive: document text}, one per relevant judgement of the split
    (qrels order), e.g. SciFact train's (claim, abstract) pairs."""
    queries, corpus, relevant = load_beir(folder, split)
    return [{"anchor": queries[query_id], "positive": corpus[doc_id]}
            for query_id, docs in relevant.items() for doc_id in docs]


class Evaluator:
    """What every evaluator shares: how it embeds, and at which sizes it scores.

    `evaluator(model) -> {metric: value}` embeds the evaluation texts once (`embeddings`), then scores them
    (`metrics`). Plain attributes, set after construction (eval.py's flags, train.py):
      batch_size, precision  encode's ("fp32", the default, "bf16", "fp16", "int8", or "auto": the fastest here
                             within measured quality bands, minilm/fast_paths.py resolve_precision)
      truncate_dim           None (the model's truncate_dim, by default the whole embedding) or the size to
                             embed at, as sentence-transformers' evaluators' truncate_dim; the metrics keep
                             their names
      truncate_dims          several sizes, e.g. (384, 256, 128, 64) for a Matryoshka model: embedded once at
                             the model's whole size, each cut to each size and scored; metrics keyed
                             "cosine_ndcg@10_dim64" (every metric here is a cosine: cutting is all it takes)
    The texts are encoded with the model's prompts as sentence-transformers' evaluators encode them: pairs with
    the default prompt (plain encode); retrieval queries with encode_query, documents with encode_document."""

    batch_size = 32
    precision = "fp32"
    truncate_dim = None
    truncate_dims = None
    main_metric = None  # each evaluator's: its key at the whole size

    @property
    def primary_metric(self) -> str:
        """The metric that says how good the model is; with truncate_dims, at the first of them."""
        return f"{self.main_metric}_dim{self.truncate_dims[0]}" if self.truncate_dims else self.main_metric

    def __call__(self, model) -> dict:
        if not self.truncate_dims:
            return self.metrics(*self.embeddings(model, self.truncate_dim))
        for dim in self.truncate_dims:
            check_truncate_dim(dim, model.embedding_dim)
        whole = self.embeddings(model, model.embedding_dim)  # once, then cut to each size
        return {f"{key}_dim{dim}": value for dim in self.truncate_dims
                for key, value in self.metrics(*(embeddings[:, :dim] for embeddings in whole)).items()}

    def embed(self, model, texts: list, truncate_dim=None, role=None, prompt=None, prompt_name=None):
        """Embed each distinct text once -> [len(texts), dim] float32 on the CPU. role: None (model.encode),
        "query" or "document" (model.encode_query / encode_document: their prompts)."""
        encode = {None: model.encode, "query": model.encode_query, "document": model.encode_document}[role]
        unique = list(dict.fromkeys(texts))
        embeddings = encode(unique, batch_size=self.batch_size, convert_to="tensor", precision=self.precision,
                            truncate_dim=truncate_dim, prompt=prompt, prompt_name=prompt_name).float().cpu()
        position = {text: index for index, text in enumerate(unique)}
        return embeddings[[position[text] for text in texts]]


class EmbeddingSimilarityEvaluator(Evaluator):
    """Pearson/Spearman of cosine similarity against gold similarity scores (STS)."""

    main_metric = "spearman_cosine"
    metric_names = ("pearson_cosine", "spearman_cosine")  # what __call__ returns

    def __init__(self, sentences1, sentences2, scores, name="", batch_size=32):
        self.sentences1, self.sentences2, self.scores = list(sentences1), list(sentences2), list(scores)
        self.name, self.batch_size = name, batch_size

    @classmethod
    def from_rows(cls, rows, name=""):
        return cls([r["sentence1"] for r in rows], [r["sentence2"] for r in rows], [r["score"] for r in rows], name)

    def embeddings(self, model, truncate_dim) -> tuple:
        embeddings = self.embed(model, self.sentences1 + self.sentences2, truncate_dim)
        return embeddings[: len(self.sentences1)], embeddings[len(self.sentences1):]

    def metrics(self, embeddings1, embeddings2) -> dict:
        return similarity_metrics(embeddings1, embeddings2, self.scores)


class BinaryClassificationEvaluator(Evaluator):
    """Is a pair similar (label 1) or not (0)? Cosine accuracy, F1, precision, recall, AP at best thresholds."""

    main_metric = "cosine_ap"
    metric_names = ("cosine_accuracy", "cosine_accuracy_threshold", "cosine_f1", "cosine_f1_threshold",
               "cosine_precision", "cosine_recall", "cosine_ap", "cosine_mcc")

    def __init__(self, sentences1, sentences2, labels, name="", batch_size=32):
        bad = [label for label in labels if label not in (0, 1)]
        if bad:
            raise ValueError(f"binary labels must be 0 or 1, found {bad[0]!r}")
        self.sentences1, self.sentences2, self.labels = list(sentences1), list(sentences2), list(labels)
        self.name, self.batch_size = name, batch_size

    def embeddings(self, model, truncate_dim) -> tuple:
        embeddings = self.embed(model, self.sentences1 + self.sentences2, truncate_dim)
        return embeddings[: len(self.sentences1)], embeddings[len(self.sentences1):]

    def metrics(self, embeddings1, embeddings2) -> dict:
        return binary_metrics(embeddings1, embeddings2, self.labels)


class InformationRetrievalEvaluator(Evaluator):
    """Each query should find its relevant documents in the corpus: MRR@10, NDCG@10, Recall@k, MAP@100."""

    main_metric = "cosine_ndcg@10"
    metric_names = tuple(f"cosine_{name}@{k}" for name, ks in RETRIEVAL_KS.items() for k in ks)

    def __init__(self, queries: dict, corpus: dict, relevant_docs: dict, name="", batch_size=32,
                 ignore_identical_ids: bool = False, query_prompt=None, query_prompt_name=None, corpus_prompt=None,
                 corpus_prompt_name=None):
        """queries: id -> text; corpus: id -> text; relevant_docs: query id -> set of corpus ids (or a dict
        corpus id -> grade: relevance is binary, as in sentence-transformers). Queries without any relevant
        document are skipped (said once, on stderr). ignore_identical_ids: a corpus entry whose id is the
        query's own id is never ranked for it (BEIR's and MTEB's convention, for corpora that contain the
        queries, e.g. duplicate questions; sentence-transformers' evaluator does not do this). A judged pair
        it skips (query "3" relevant to document "3": ids numbered separately, not a query in the corpus) can
        never be found, so every metric falls: how many is said on stderr, naming --keep-self-matches.
        query_prompt(_name), corpus_prompt(_name): as sentence-transformers' evaluator has them (also plain
        attributes); None: queries get the model's "query" prompt, documents its "document" (or "passage",
        "corpus") prompt, when it has one (encode_query, encode_document)."""
        self.query_ids = [qid for qid in queries if relevant_docs.get(qid)]
        self.name, self.batch_size = name, batch_size
        self.query_prompt, self.query_prompt_name = query_prompt, query_prompt_name
        self.corpus_prompt, self.corpus_prompt_name = corpus_prompt, corpus_prompt_name
        skipped = len(queries) - len(self.query_ids)
        if skipped:
            print(f"{name or 'retrieval'}: {skipped} of {len(queries)} queries have no relevance judgement; "
                  f"they are skipped", file=sys.stderr)
        # Corpus sorted by id, so that equal scores rank the lower id first (as sentence-transformers does).
        self.corpus_ids = sorted(corpus)
        index = {cid: i for i, cid in enumerate(self.corpus_ids)}
        self.queries = [queries[qid] for qid in self.query_ids]
        self.corpus = [corpus[cid] for cid in self.corpus_ids]
        self.relevant = [{index[cid] for cid in relevant_docs[qid]} for qid in self.query_ids]
        self.skip = [index.get(qid, -1) for qid in self.query_ids] if ignore_identical_ids else None
        if ignore_identical_ids:
            self._warn_judged_self_matches(relevant_docs)

    def _warn_judged_self_matches(self, relevant_docs: dict) -> None:
        judged = sum(len(relevant_docs[qid]) for qid in self.query_ids)
        own = [qid for qid in self.query_ids if qid in relevant_docs[qid]]
        if own:
            print(f"{self.name or 'retrieval'}: warning: {len(own)} of {judged} judged (query, document) pairs "
                  f"pair a query with the document of its own id (e.g. query {own[0]!r} and document {own[0]!r}) "
                  "and are skipped: BEIR's convention skips a document with the query's id, for corpora that hold "
                  "their queries; they can never be found and lower every metric. If query and document ids are "
                  "numbered separately, pass --keep-self-matches to count them", file=sys.stderr)

    @classmethod
    def from_pairs(cls, anchors, positives, name=""):
        """Each anchor is a query whose one relevant document is its positive; the corpus is all positives."""
        corpus_ids = {}
        for text in positives:
            corpus_ids.setdefault(text, f"d{len(corpus_ids):07d}")
        queries = {f"q{i:07d}": text for i, text in enumerate(anchors)}
        relevant = {f"q{i:07d}": {corpus_ids[text]} for i, text in enumerate(positives)}
        return cls(queries, {cid: text for text, cid in corpus_ids.items()}, relevant, name)

    @classmethod
    def from_beir(cls, folder, split: str, name="", keep_self_matches: bool = False):
        """A BEIR folder's split. A document whose id is the query's own is skipped (BEIR's default), unless
        keep_self_matches: for folders whose query and document ids are numbered separately."""
        queries, corpus, relevant = load_beir(folder, split)
        return cls(queries, corpus, relevant, name or f"{Path(folder).name}-{split}",
                   ignore_identical_ids=not keep_self_matches)

    def embeddings(self, model, truncate_dim) -> tuple:
        queries = self.embed(model, self.queries, truncate_dim, "query", self.query_prompt, self.query_prompt_name)
        corpus = self.embed(model, self.corpus, truncate_dim, "document", self.corpus_prompt,
                            self.corpus_prompt_name)
        return queries, corpus

    def metrics(self, queries, corpus) -> dict:
        return retrieval_metrics(queries, corpus, self.relevant, skip=self.skip)


class LabelAccuracyEvaluator(Evaluator):
    """Accuracy of a pair classifier (SoftmaxLoss's Linear over concat(u, v, |u - v|))."""

    main_metric = "accuracy"
    metric_names = ("accuracy",)

    def __init__(self, sentences1, sentences2, labels, classifier, name="", batch_size=32):
        self.sentences1, self.sentences2, self.labels = list(sentences1), list(sentences2), list(labels)
        self.classifier, self.name, self.batch_size = classifier, name, batch_size

    def embeddings(self, model, truncate_dim) -> tuple:
        if truncate_dim not in (None, model.embedding_dim) or self.truncate_dims:
            raise ValueError(f"the nli evaluator scores with the SoftmaxLoss classifier, which reads whole "
                             f"{model.embedding_dim}-d embeddings: it takes no truncate_dim")
        embeddings = self.embed(model, self.sentences1 + self.sentences2, model.embedding_dim)
        return embeddings[: len(self.sentences1)], embeddings[len(self.sentences1):]

    def metrics(self, u, v) -> dict:
        weight = next(self.classifier.parameters())
        with torch.no_grad():
            logits = self.classifier(pair_features(u, v).to(weight.device, weight.dtype))
        predicted = logits.argmax(dim=-1).cpu()
        return {"accuracy": float((predicted == torch.tensor(self.labels)).float().mean())}


# The evaluator class of each task, for what is known before any data is read (train.py's --metric-for-best).
TASK_EVALUATORS = {"stsb": EmbeddingSimilarityEvaluator, "stsb-binary": BinaryClassificationEvaluator,
                   "sick": EmbeddingSimilarityEvaluator, "nli": LabelAccuracyEvaluator,
                   "pairs": EmbeddingSimilarityEvaluator, "binary": BinaryClassificationEvaluator,
                   "retrieval": InformationRetrievalEvaluator}


def for_task(task: str, location, split: str, classifier=None, binary_threshold: float = 0.6,
             keep_self_matches: bool = False):
    """The evaluator of one eval.py/train.py task on its data; a problem with the data is a DataError.
    keep_self_matches: retrieval on a BEIR folder counts a judged document whose id is the query's own
    (--keep-self-matches); a ValueError for any other task, where it would mean nothing."""
    beir = task == "retrieval" and Path(location).is_dir()
    if keep_self_matches and not beir:
        raise ValueError(f"--keep-self-matches is for the retrieval task on a BEIR folder, not {task} on "
                         f"{location}")
    if task == "stsb":
        return EmbeddingSimilarityEvaluator.from_rows(data.load_stsb(location, split), name=f"sts-{split}")
    if task == "stsb-binary":  # STS-B pairs labelled similar when their score is at least 3 of 5
        rows = data.load_stsb(location, split)
        return BinaryClassificationEvaluator([r["sentence1"] for r in rows], [r["sentence2"] for r in rows],
                                             [int(r["score"] >= binary_threshold) for r in rows],
                                             name=f"sts-{split}-binary")
    if task == "sick":
        rows = data.load_sick(location, split)
        return EmbeddingSimilarityEvaluator([r["premise"] for r in rows], [r["hypothesis"] for r in rows],
                                            [r["score"] for r in rows], name=f"sick-{split}")
    if task == "nli":
        if classifier is None:
            raise ValueError("the nli task needs the classifier of a model trained with SoftmaxLoss")
        if data.is_snli(location):  # the file is the split: snli_1.0_test.jsonl.gz
            rows = data.load_snli(location)
            return LabelAccuracyEvaluator([r["premise"] for r in rows], [r["hypothesis"] for r in rows],
                                          [r["label"] for r in rows], classifier, name=Path(location).name.split(".")[0])
        rows = data.load_sick(location, split)
        return LabelAccuracyEvaluator([r["premise"] for r in rows], [r["hypothesis"] for r in rows],
                                      [r["label"] for r in rows], classifier, name=f"sick-nli-{split}")
    if beir:
        return InformationRetrievalEvaluator.from_beir(location, split, keep_self_matches=keep_self_matches)
    rows = data.read_dataset(location, num_labels=2 if task == "binary" else None).rows  # binary: 0/1, by line
    name = Path(location).stem
    needed = {"pairs": ("sentence1", "sentence2", "score"), "binary": ("sentence1", "sentence2", "label"),
              "retrieval": ("anchor", "positive")}.get(task, ())
    missing = [column for column in needed if rows and column not in rows[0]]
    if missing:
        what = " (or a BEIR folder: corpus.jsonl, queries.jsonl, qrels/)" if task == "retrieval" else ""
        raise data.DataError(f"{location}: columns {sorted(rows[0])}; the {task} task reads {', '.join(needed)}"
                             f"{what}")
    if task == "pairs":
        return EmbeddingSimilarityEvaluator.from_rows(rows, name=name)
    if task == "binary":
        return BinaryClassificationEvaluator([r["sentence1"] for r in rows], [r["sentence2"] for r in rows],
                                             [int(r["label"]) for r in rows], name=name)
    if task == "retrieval":
        return InformationRetrievalEvaluator.from_pairs([r["anchor"] for r in rows], [r["positive"] for r in rows],
                                                        name=name)
    raise ValueError(f"unknown evaluation task {task!r}; expected one of {TASKS}")
