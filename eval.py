"""Evaluate a sentence-embedding model on a local benchmark and print (and optionally save) its metrics.

    python eval.py --model sentence-transformers/all-MiniLM-L6-v2 --task stsb --data ../shared/data/stsb
    python eval.py --model runs/cosine --task sick --data ../shared/data/sick/SICK.tsv --json metrics.json
    python eval.py --model sentence-transformers/all-MiniLM-L6-v2 --task retrieval --data ../shared/data/scifact
    python eval.py --model runs/mnrl --task stsb --data ../shared/data/stsb --precision bf16   # the bf16 fast path
    python eval.py --model runs/mnrl --task stsb --data ../shared/data/stsb --precision auto   # the fastest here
    python eval.py --model runs/matryoshka --task retrieval --data ../shared/data/scifact --truncate-dim 384,128,64

Tasks:
  stsb      STS benchmark: Pearson/Spearman of cosine similarity vs gold scores (--data: the stsb directory)
  stsb-binary  STS-B pairs as similar (score >= 3/5) or not: binary-classification metrics
  sick      SICK relatedness: the same metrics on SICK's relatedness scores (--data: SICK.tsv)
  nli       3-way entailment: accuracy of the softmax classifier saved with a SoftmaxLoss model
            (--data: SICK.tsv with --split, or an SNLI file such as ../shared/data/snli/snli_1.0_test.jsonl.gz)
  pairs     any TSV/CSV/JSONL with sentence1, sentence2, score (0..1): Pearson/Spearman
  binary    any file with sentence1, sentence2, label (0/1): accuracy, F1, precision, recall, AP, thresholds
  retrieval a BEIR-layout folder (corpus.jsonl, queries.jsonl, qrels/<split>.tsv), e.g. --data
            ../shared/data/scifact --split test; or any file with anchor, positive: each anchor must find its
            positive among all positives (accuracy/precision/recall@k, MRR@10, NDCG@10, MAP@100). In a BEIR
            folder a document with the query's own id is skipped (BEIR's convention, for corpora holding their
            queries); --keep-self-matches counts it, for folders whose ids are numbered separately
"""

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

import minilm
from minilm import data, evaluation, fast_paths
from minilm.errors import InputError, Parser, UsageError, positive_int
from minilm.files import write_text
from losses.softmax import SoftmaxLoss
from minilm.model import PRECISIONS, check_truncate_dim, resolve_device

SPLITS = {"stsb": ("train", "dev", "test"), "stsb-binary": ("train", "dev", "test"),
          "sick": ("train", "trial", "dev", "test"), "nli": ("train", "trial", "dev", "test")}  # SICK: dev = trial


def dimensions(text):
    """--truncate-dim: N, or N,M,... for a metric at each size."""
    sizes = [positive_int(part.strip()) for part in text.split(",")]
    if len(set(sizes)) != len(sizes):
        raise argparse.ArgumentTypeError(f"a size appears twice in {text!r}")
    return sizes


def main(argv=None) -> int:
    """-> exit status: 0, or 2 after one line naming the flag or file at fault."""
    try:
        return evaluate(argv)
    except (UsageError, data.DataError) as error:
        print(f"eval.py: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # --json is written whole at the very end (write_text): nothing half-written
        print("\neval.py: interrupted; nothing was written (--json comes at the end)", file=sys.stderr)
        return 130


def check_json_target(path: str, inputs: list) -> None:
    """--json must be writable before minutes of evaluation are spent, and never replace a file eval.py did not
    write: not an input (the data, a file of the model's folder), not any file other than an earlier result."""
    target = Path(path)
    if target.is_dir():
        raise UsageError(f"--json {path}: is a folder; give a file name")
    for flag, location in inputs:
        source = Path(location)
        if target.exists() and source.exists() and (source.resolve() == target.resolve()
                                                    or source.resolve() in target.resolve().parents):
            raise UsageError(f"--json {path}: is {'a file of ' if source.is_dir() else ''}{flag} {location}; write "
                             "the metrics beside the inputs, not over them")
    if target.exists():
        try:
            earlier = json.loads(target.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError):
            earlier = None
        if not (isinstance(earlier, dict) and {"model", "task", "metrics"} <= set(earlier)):
            raise UsageError(f"--json {path}: exists and is not an earlier eval.py result; choose another name "
                             "(eval.py replaces only its own results)")
    folder = target.parent
    if not folder.is_dir():
        raise UsageError(f"--json {path}: the folder {folder} does not exist")
    if not os.access(folder, os.W_OK | os.X_OK) or (target.exists() and not os.access(target, os.W_OK)):
        raise UsageError(f"--json {path}: cannot write there (read-only or no permission)")


def build_parser() -> Parser:
    parser = Parser(prog="eval.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="a model directory or a hub id")
    parser.add_argument("--task", required=True, choices=evaluation.TASKS)
    parser.add_argument("--data", required=True, help="the data file or directory of the task (see above)")
    parser.add_argument("--split", default=None, help="split of stsb/sick/nli or of a BEIR folder's qrels "
                        "(default: test); a single file (pairs, binary, an SNLI file...) is its own split")
    parser.add_argument("--batch-size", type=positive_int, default=32, help="texts per encode batch (default: 32)")
    parser.add_argument("--precision", default="fp32", choices=[*PRECISIONS, fast_paths.AUTO],
                        help="encode's precision: fp32 (default, the reference), bf16 or fp16 weights and "
                        "activations, or int8 Linears (all but the attention's q/k/v); to check what a faster "
                        "precision costs in quality. auto: the fastest here within measured quality bands (the "
                        "output and --json name the precision it ran)")
    parser.add_argument("--device", default=None, help="cpu, cuda, ... (default: CUDA when available)")
    parser.add_argument("--truncate-dim", type=dimensions, default=None, metavar="N[,M...]",
                        help="score the embeddings cut to their first N dimensions (a Matryoshka model's smaller "
                        "sizes); several sizes, e.g. 384,256,128,64: encoded once, each metric reported per size "
                        "as NAME_dimN (default: the model's truncate_dim, else the whole embedding)")
    parser.add_argument("--query-prompt", default=None, metavar="TEXT", help="retrieval: put TEXT before every "
                        "query (default: the model's \"query\" prompt, else its default prompt, else none)")
    parser.add_argument("--corpus-prompt", default=None, metavar="TEXT", help="retrieval: put TEXT before every "
                        "document (default: the model's \"document\", \"passage\" or \"corpus\" prompt, else its "
                        "default prompt, else none). Pairs (stsb, sick, nli, ...) get the model's default prompt")
    parser.add_argument("--json", help="also write the metrics to this JSON file")
    parser.add_argument("--keep-self-matches", action="store_true", help="retrieval on a BEIR folder: count a "
                        "judged document whose id is the query's own (query 3 relevant to document 3). By default "
                        "it is skipped, as BEIR and MTEB do for corpora that hold their queries, and a warning says "
                        "how many judged pairs that skips")
    return parser


def evaluate(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)

    has_splits = ((args.task in SPLITS and not data.is_snli(args.data))
                  or (args.task == "retrieval" and Path(args.data).is_dir()))
    if args.split is not None and not has_splits:
        parser.error(f"--split {args.split}: --data {args.data} is a single file, its own split; --split "
                     "chooses a split of stsb, sick, nli (SICK.tsv) or a BEIR folder")
    args.split = args.split or "test"
    if args.keep_self_matches and not (args.task == "retrieval" and Path(args.data).is_dir()):
        parser.error(f"--keep-self-matches is for --task retrieval on a BEIR folder, not --task {args.task} "
                     f"--data {args.data}")
    if args.truncate_dim and args.task == "nli":
        parser.error("--truncate-dim: the nli task scores with the SoftmaxLoss classifier, which reads the whole "
                     "embedding")
    if (args.query_prompt is not None or args.corpus_prompt is not None) and args.task != "retrieval":
        parser.error(f"--query-prompt and --corpus-prompt are for --task retrieval, not {args.task} (pairs are "
                     "encoded with the model's default prompt)")
    if args.task in SPLITS and has_splits and args.split not in SPLITS[args.task]:
        parser.error(f"--split for {args.task} must be one of {SPLITS[args.task]}, not {args.split!r}")
    try:
        fast_paths.check_environment()
    except InputError as error:
        raise UsageError(str(error)) from None
    if args.json:
        check_json_target(args.json, [("--data", args.data), ("--model", args.model)])
    if args.device is not None:
        try:
            resolve_device(args.device)
        except InputError as error:
            raise UsageError(f"--device {args.device}: {error}") from None
    if not Path(args.data).exists():
        raise UsageError(f"--data {args.data}: no such file or folder")
    try:
        model = minilm.load(args.model, device=args.device)
    except Exception as error:  # the loader's messages name the file and field
        raise UsageError(f"--model {args.model}: {_first_line(error)}") from None
    try:
        classifier = SoftmaxLoss.load_classifier(model.source_dir) if args.task == "nli" else None
        evaluator = evaluation.for_task(args.task, args.data, args.split, classifier=classifier,
                                        keep_self_matches=args.keep_self_matches)
    except (OSError, ValueError, KeyError) as error:
        raise UsageError(f"--task {args.task} --data {args.data}: {_first_line(error)}") from None
    asked, args.precision = args.precision, fast_paths.resolve_precision(model.device, args.precision)
    try:  # $MINILM_LINEAR against the precision that runs: one line now, not a traceback at the first batch
        fast_paths.check_environment(model.device, args.precision)
    except InputError as error:
        raise UsageError(f"--precision {asked}: {error}") from None
    configure(evaluator, args, model)
    start = time.perf_counter()
    with torch.inference_mode():
        metrics = evaluator(model)
    seconds = time.perf_counter() - start

    split = args.split if has_splits else None
    # the sizes scored: --truncate-dim, else the model's own truncate_dim (nli: always the whole embedding)
    sizes = args.truncate_dim or ([model.truncate_dim] if model.truncate_dim and args.task != "nli" else None)
    own_size = f", truncate_dim {model.truncate_dim} (the model's)" if sizes and not args.truncate_dim else ""
    print(f"{args.task}{f' ({split})' if split else ''} on {args.data} with {args.model}, precision "
          f"{args.precision}{f' ({asked})' if asked != args.precision else ''}{own_size}, {seconds:.1f} s")
    for key, value in metrics.items():
        print(f"  {key:32s} {value:.4f}")
    if args.json:
        result = {"model": args.model, "task": args.task, "data": args.data, "split": split,
                  "precision": args.precision, "truncate_dim": sizes, "metrics": metrics}
        write_text(args.json, json.dumps(result, indent=2) + "\n")  # whole or not at all
    return 0


def configure(evaluator, args, model) -> None:
    """The evaluator's encode settings from the flags: batch size, precision, sizes, prompts."""
    evaluator.batch_size, evaluator.precision = args.batch_size, args.precision
    for dim in args.truncate_dim or []:
        try:
            check_truncate_dim(dim, model.embedding_dim)
        except InputError as error:
            raise UsageError(f"--truncate-dim {dim}: {error}") from None
    if args.truncate_dim and len(args.truncate_dim) > 1:
        evaluator.truncate_dims = args.truncate_dim  # one encode, every metric per size
    elif args.truncate_dim:
        evaluator.truncate_dim = args.truncate_dim[0]
    if args.task == "retrieval":
        evaluator.query_prompt, evaluator.corpus_prompt = args.query_prompt, args.corpus_prompt


def _first_line(error: Exception) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


if __name__ == "__main__":
    sys.exit(main())
