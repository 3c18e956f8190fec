"""README.md for a trained model, in the shape of sentence-transformers' generated model cards.

What a reader of the card needs to repeat or judge the run: the architecture, the data (size, columns, token
statistics, samples), the loss and its parameters, every hyperparameter, the training log, the evaluation
metrics (and which step's model was kept, and why), and the framework versions. Plus loss.png, the training
loss and evaluation curves (minilm/curves.py), when matplotlib is installed.

Every text that comes from the run (training sentences, file names, flag values) is escaped for where it lands:
HTML and Markdown in the body, a JSON string in the YAML front matter, a fence longer than any run of backticks
in code blocks. A sentence can never add markup, links or scripts to the card.
"""

import html
import json
import re
import platform
from pathlib import Path

import numpy as np
import torch

import minilm
from minilm import curves, evaluation, files, pooling

SBERT_CITATION = """@inproceedings{reimers-2019-sentence-bert,
    title = "Sentence-BERT: Sentence Embeddings using Siamese BERT-Networks",
    author = "Reimers, Nils and Gurevych, Iryna",
    booktitle = "Proceedings of the 2019 Conference on Empirical Methods in Natural Language Processing",
    month = "11",
    year = "2019",
    publisher = "Association for Computational Linguistics",
    url = "https://arxiv.org/abs/1908.10084",
}"""

# train.py's flags that are hyperparameters (the rest say where things are), with train.py's defaults
# (tests/test_train.py holds them equal). The card lists them all, and as "Non-Default Hyperparameters" every one
# that differs from its default: a run with --weight-decay 0.01 or --grad-accum 4 says so.
NON_DEFAULT = {"batch_size": 32, "epochs": 1, "max_steps": 0, "lr": 5e-5, "weight_decay": 0.0, "warmup_ratio": 0.0,
               "warmup_steps": 0, "max_grad_norm": 1.0, "grad_accum": 1, "seed": 42, "precision": "auto",
               "max_seq_length": None, "normalize": "keep", "min_score": 0.8, "eval_steps": 0, "log_steps": 50,
               "save_steps": 500, "score_scale": 1.0, "metric_for_best": None, "load_best": None,
               "early_stopping_patience": 0, "prompts": None, "matryoshka_dims": None, "matryoshka_weights": None,
               "teacher": None, "layers": None, "eval_precision": "fp32"}
HYPERPARAMETERS = list(NON_DEFAULT)


def column_statistics(rows: list, column: str, tokenize_ids) -> tuple:
    """(type, details) of one column over the first 1000 rows: token counts for text, spread for numbers."""
    values = [row[column] for row in rows[:1000]]
    if isinstance(values[0], np.ndarray):  # a teacher's embeddings (distillation)
        return "embedding", f"<ul><li>size: {len(values[0])}</li><li>the teacher's, as the labels</li></ul>"
    if isinstance(values[0], str):
        counts = [len(ids) for ids in tokenize_ids(values)]
        return "string", (f"<ul><li>min: {min(counts)} tokens</li><li>mean: {sum(counts) / len(counts):.2f} tokens"
                          f"</li><li>max: {max(counts)} tokens</li></ul>")
    if isinstance(values[0], int):
        shares = {value: values.count(value) / len(values) for value in sorted(set(values))}
        return "int", "<ul>" + "".join(f"<li>{k}: ~{100 * v:.2f}%</li>" for k, v in shares.items()) + "</ul>"
    return "float", (f"<ul><li>min: {min(values):.2f}</li><li>mean: {sum(values) / len(values):.2f}</li>"
                     f"<li>max: {max(values):.2f}</li></ul>")


def _table(header: list, rows: list) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(":---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def _text(value) -> str:
    """Any value as inert Markdown/HTML text on one line: HTML escaped, Markdown punctuation backslashed."""
    text = html.escape(" ".join(str(value).split()), quote=True)
    return re.sub(r"([\\`*_{}\[\]()#+!|~])", r"\\\1", text)


def _code(text) -> str:
    """A table cell in <code>: HTML escaped (no tag can open), Markdown punctuation as entities (no cell can end,
    no link can form), one line."""
    text = html.escape(" ".join(str(text).split())[:300], quote=True)
    return "<code>" + re.sub(r"[\\`*_{}\[\]()#+!|~]", lambda match: f"&#{ord(match.group())};", text) + "</code>"


def _inert_json(value) -> str:
    """JSON with <, > and & as \\u escapes: the same value read as YAML, JSON or a Python literal, and no markup."""
    return json.dumps(value).replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def _yaml_string(text) -> str:
    return _inert_json(str(text))


def _fence(language: str, code: str) -> str:
    """A fenced code block that no backticks inside the code can close."""
    longest = max((len(run) for run in re.findall(r"`+", code)), default=0)
    fence = "`" * max(3, longest + 1)
    return f"{fence}{language}\n{code}\n{fence}"


def architecture(model) -> str:
    pooling_config = pooling.pooling_config(model.pooling_modes, model.encoder.config.hidden_size)
    lines = ["SentenceTransformer(",
             f"  (0): Transformer({{'max_seq_length': {model.max_seq_length}, 'do_lower_case': "
             f"{model.tokenizer.do_lower_case}, 'architecture': 'BertModel'}})",
             f"  (1): Pooling({pooling_config})"]
    if model.normalize:
        lines.append("  (2): Normalize()")
    return "\n".join(lines + [")"])


def training_log_table(history: list, figures: dict, eval_key, kept_step) -> str:
    """The figures of loss.png (curves.series of the history) as a table, one row a step; the kept step's row in
    bold, as in sentence-transformers' cards."""
    rows = {step: {"loss": f"{loss:.4f}"} for step, loss in figures["loss"]}
    if figures["partial"]:
        step, loss, steps = figures["partial"]
        rows[step] = {"loss": f"{loss:.4f} (mean of the last {steps} step(s) only)"}
    for step, value in figures["eval"]:
        rows.setdefault(step, {})["eval"] = f"{value:.4f}"
    epochs = {entry["step"]: entry["epoch"] for entry in history}
    table = []
    for step in sorted(rows):
        cells = [epochs[step], step, rows[step].get("loss", "-")] + ([rows[step].get("eval", "-")] if eval_key else [])
        table.append([f"**{cell}**" for cell in cells] if step == kept_step else cells)
    header = ["Epoch", "Step", "Training Loss"] + ([_text(eval_key.removeprefix("eval_"))] if eval_key else [])
    note = "\n\n* The bold row is the step whose model was saved (--load-best)." if kept_step is not None else ""
    return _table(header, table) + note


def training_logs(out_dir: Path, history: list, best: dict, train_seconds: float) -> list:
    """loss.png (when matplotlib is there) and the card's parts that show the same figures."""
    figures = curves.series(history, best["metric"], best["kept_step"])
    has_plot = curves.plot(figures, best["metric"], out_dir / "loss.png")
    return [training_log_table(history, figures, best["metric"], best["kept_step"]),
            f"Training took {train_seconds:.0f} s." + ("\n\n![training curves](loss.png)" if has_plot else "")]


def write(out_dir, settings: dict, model, loss_fn, datasets, history, metrics, evaluator, train_seconds,
          best=None, precision=None) -> Path:
    """Write out_dir/README.md (and loss.png).

    settings: the run's settings as a plain dict (train.py's flags by name: model, batch_size, lr, ...);
    datasets: [(source, rows, text_columns, label_column)]; metrics: the evaluation of the model saved;
    best: minilm.best_model's summary ({"metric": the log key of the metric drawn, "kept_step", "text"});
    evaluator: the run's (its name heads the metrics; its precision, --eval-precision auto resolved, is what the
    evaluation encoded in), or None; precision: what training computed in (--precision auto resolved).
    """
    out_dir = Path(out_dir)
    base = settings.get("model")
    loss_name = type(loss_fn).__name__
    size = sum(len(rows) for _, rows, _, _ in datasets)
    best = best or {"metric": None, "kept_step": None, "text": ""}
    _, first_rows, first_text_columns, _ = datasets[0]
    sample = first_rows[0]
    # what encode returns, as sentence-transformers' card says it: the model's truncate_dim when it has one
    output_dim = model.truncate_dim or model.embedding_dim
    cut = f" (the first of its {model.embedding_dim}: truncate_dim)" if model.truncate_dim else ""

    parts = [_front_matter(base, size, loss_name, first_rows, first_text_columns, metrics),
             f"# SentenceTransformer based on {_text(base)}",
             f"This is a [sentence-transformers](https://www.SBERT.net)-compatible model fine-tuned with "
             f"minilm from {_text(base)}. It maps sentences & paragraphs to a "
             f"{output_dim}-dimensional dense vector space and can be used for semantic textual similarity, "
             f"semantic search, paraphrase mining, text classification, clustering, and more.",
             "## Model Details", "### Model Description",
             f"- **Model Type:** Sentence Transformer\n- **Base model:** {_text(base)}\n"
             f"- **Maximum Sequence Length:** {model.max_seq_length} tokens\n"
             f"- **Output Dimensionality:** {output_dim} dimensions{cut}\n"
             f"- **Similarity Function:** Cosine Similarity\n"
             f"- **Training Dataset:** {', '.join(_text(source) for source, *_ in datasets)}"
             + _prompts_line(model),
             "### Full Model Architecture", _fence("", architecture(model)),
             "## Usage", "### Direct Usage (Sentence Transformers)",
             _fence("python", "from sentence_transformers import SentenceTransformer\n\n"
                    f"model = SentenceTransformer({_inert_json(out_dir.name)})  # this folder's path, or its hub id\n"
                    f"embeddings = model.encode({_inert_json([sample[c] for c in first_text_columns[:2]])})\n"
                    "print(embeddings.shape)"),
             "### Direct Usage (minilm)",
             _fence("python", "import minilm\n\n"
                    f"model = minilm.load({_inert_json(out_dir.name)})  # this folder's path\n"
                    "embeddings = model.encode([\"The weather is lovely today.\", \"It's so sunny outside!\"])\n"
                    "print(model.similarity(embeddings, embeddings))")]
    if metrics:
        # best["text"] is minilm's own sentence (numbers, and metric names from evaluation.py's lists): as it is
        parts += ["## Evaluation", "### Metrics", f"#### {_text(evaluator.name)}",
                  *([best["text"]] if best["text"] else []), *_precision_line(settings, evaluator.precision),
                  *_dimensions_table(settings, metrics),
                  _table(["Metric", "Value"], [[_text(key), f"{value:.4f}"] for key, value in metrics.items()])]

    parts += ["## Training Details", "### Training Dataset", *_training_dataset(datasets, model, loss_fn)]

    non_default = {key: settings[key] for key, default in NON_DEFAULT.items() if settings.get(key, default) != default}
    parts += ["### Training Hyperparameters", "#### Non-Default Hyperparameters",
              "\n".join(f"- `{key}`: {_text(value)}" for key, value in non_default.items()),
              "#### All Hyperparameters", "<details><summary>Click to expand</summary>\n\n"
              + "\n".join(f"- `{key}`: {_text(settings.get(key))}" for key in HYPERPARAMETERS) + "\n\n</details>",
              # auto picks per machine (bf16 on most GPUs, fp32 on the CPU): say what this run computed in
              *([f"Training computed in {_text(precision)} (--precision auto)."]
                if precision and settings.get("precision") == "auto" else []),
              "### Training Logs", *training_logs(out_dir, history, best, train_seconds),
              "### Framework Versions",
              f"- Python: {platform.python_version()}\n- minilm: {minilm.__version__}\n"
              f"- PyTorch: {torch.__version__}\n- Tokenizers: {_version('tokenizers')}\n"
              f"- safetensors: {_version('safetensors')}",
              "## Citation", "### BibTeX", "#### Sentence Transformers", _fence("bibtex", SBERT_CITATION)]
    citation = getattr(loss_fn, "citation", None)
    if citation:
        parts += [f"#### {loss_name}", _fence("bibtex", citation.strip())]
    path = out_dir / "README.md"
    files.write_text(path, "\n\n".join(parts) + "\n")
    return path


def _training_dataset(datasets, model, loss_fn) -> list:
    """The card's "Training Dataset" parts: each source's size, the first one's columns, statistics and samples,
    and the loss with its parameters."""
    _, first_rows, first_text_columns, label_column = datasets[0]
    columns = list(first_text_columns) + ([label_column] if label_column else [])
    stats = [column_statistics(first_rows, column, model.tokenizer.encode_ids) for column in columns]
    stats_table = _table([""] + [_text(c) for c in columns],
                         [["type"] + [t for t, _ in stats], ["details"] + [d for _, d in stats]])
    samples_table = _table([_text(c) for c in columns], [[_sample(row[c]) for c in columns] for row in first_rows[:3]])
    parts = [f"#### {_text(source)}\n\n* Size: {len(rows):,} training samples" for source, rows, _, _ in datasets]
    return parts + [f"* Columns: {', '.join(_code(c) for c in columns)}",
                    "* Approximate statistics based on the first 1000 samples:\n" + stats_table,
                    "* Samples:\n" + samples_table,
                    f"* Loss: <code>{type(loss_fn).__name__}</code> with these parameters:\n"
                    + _fence("json", json.dumps(loss_fn.config(), indent=4))]


def _sample(value) -> str:
    """A sample's cell: the text, or the first numbers of a teacher's embedding."""
    if isinstance(value, np.ndarray):
        return _code("[" + ", ".join(f"{number:.4f}" for number in value[:3]) + f", ...] ({len(value)} numbers)")
    return _code(value)


def _precision_line(settings: dict, eval_precision: str) -> list:
    """The precision the metrics were encoded in, where it is not fp32: what ran, and auto named as its source
    (auto picks per machine, so a card showing only `eval_precision: auto` would not say)."""
    if eval_precision == "fp32":
        return []
    source = ("--eval-precision auto: the fastest on the machine that trained" if settings.get("eval_precision") ==
              "auto" else f"--eval-precision {_text(eval_precision)}")
    return [f"The embeddings of these metrics were computed in {_text(eval_precision)} ({source})."]


def _dimensions_table(settings: dict, metrics: dict) -> list:
    """With --matryoshka-dims: the main metric at each trained size (the model encodes at any of them with
    truncate_dim), as a table; [] otherwise."""
    dims, task = settings.get("matryoshka_dims"), settings.get("eval_task")
    if not dims or task not in evaluation.TASK_EVALUATORS:
        return []
    main = evaluation.TASK_EVALUATORS[task].main_metric
    rows = [[dim, f"{metrics[f'{main}_dim{dim}']:.4f}"] for dim in dims if f"{main}_dim{dim}" in metrics]
    return [_table(["Dimensions (truncate_dim)", _text(main)], rows)] if rows else []


def _prompts_line(model) -> str:
    """The Model Description's line on prompts, when the model has any: they are part of how it encodes."""
    named = [f"{_code(name)}: {_code(json.dumps(prompt))}" for name, prompt in model.prompts.items() if prompt]
    if not named:
        return ""
    default = f"; default: {_code(model.default_prompt_name)}" if model.default_prompt_name else ""
    return (f"\n- **Prompts:** {', '.join(named)}{default} (encode_query and encode_document use the query and "
            "document prompts; encode(..., prompt_name=NAME) any of them)")


def _front_matter(base, size, loss_name, rows, text_columns, metrics) -> str:
    """The card's YAML header: tags, base model, a widget from the first rows, the metric names."""
    front = ["---", "tags:", "- sentence-transformers", "- sentence-similarity", "- feature-extraction", "- dense",
             "- minilm", f"- dataset_size:{size}", f"- loss:{loss_name}", f"base_model: {_yaml_string(base)}",
             "widget:", f"- source_sentence: {_yaml_string(rows[0][text_columns[0]])}", "  sentences:"]
    front += [f"  - {_yaml_string(row[text_columns[-1]])}" for row in rows[:3]]
    front += ["pipeline_tag: sentence-similarity", "library_name: sentence-transformers"]
    if metrics:
        front += ["metrics:"] + [f"- {_yaml_string(key)}" for key in metrics]
    return "\n".join(front + ["---"])


def _version(package: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return "unknown"
