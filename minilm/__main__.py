"""python -m minilm: compare sentences, embed a corpus to disk, search it.

    python -m minilm "A man eats." "Someone is eating."       cosine similarity matrix (also: similarity ...)
    python -m minilm encode INPUT --out DIR                     stream INPUT's texts into DIR (resumable; torchrun)
    python -m minilm search DIR "a query" ...                   the top hits of each query in DIR
"""

import argparse
import os
import sys
import unicodedata
from pathlib import Path

from minilm.corpus import MIN_CALIBRATION
from minilm.corpus_folder import STORAGES
from minilm.errors import InputError
from minilm.fast_paths import AUTO
from minilm.model import PRECISIONS

EXAMPLES = ["A man is eating food.", "Someone is having a meal.", "A man is riding a horse.",
            "The stock market fell sharply today."]
MODEL = "sentence-transformers/all-MiniLM-L6-v2"
COMMANDS = ("similarity", "encode", "search")


def similarity(args) -> None:
    import minilm

    sentences = args.sentences or EXAMPLES
    model = _load(args.parser, args.model, args.device)
    embeddings = model.encode(sentences)
    count = f"{len(sentences)} sentence{'s' * (len(sentences) != 1)}"
    print(f"{args.model}: {count} -> {embeddings.shape[1]}-d embeddings "
          f"(device {model.device}, attention backend {model.backends.attention or 'auto'})\n")
    similarities = minilm.SentenceEncoder.similarity(embeddings, embeddings)
    for i, sentence in enumerate(sentences):
        print(f"[{i}] {sentence}")
    print("\ncosine similarity\n      " + "".join(f"[{j}]    " for j in range(len(sentences))))
    for i, row in enumerate(similarities.tolist()):
        print(f"[{i}]  " + "".join(f"{value:6.3f} " for value in row))


def encode(args) -> None:
    from minilm import corpus

    if args.dtype is not None:  # the flag's earlier name: --precision is how encode computes, --storage what it keeps
        named = args.dtype if args.dtype in STORAGES else "|".join(STORAGES)
        _fail(args.parser, f"--dtype {args.dtype}: the stored format is --storage now (--storage {named}); "
                           "--precision is how encode computes")
    try:  # before loading the model: a bad setting costs no time
        corpus.check_options(args.storage, args.batch_size, args.window, args.calibration_size)
    except corpus.CorpusError as error:
        _fail(args.parser, str(error))
    device = args.device
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and device is None:
        import torch

        if torch.cuda.is_available():  # one GPU per process under torchrun
            device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
            torch.cuda.set_device(device)
    model = _load(args.parser, args.model, device, args.max_seq_length)
    try:
        manifest = corpus.encode_corpus(
            model, args.input, args.out, model_name=args.model, fmt=args.format, field=args.field,
            id_field=args.id_field, storage=args.storage, precision=args.precision, normalize=args.normalize,
            batch_size=args.batch_size, window=args.window, calibration_size=args.calibration_size,
            overwrite=args.overwrite, progress=not args.no_progress, log=_rank0_print,
            truncate_dim=args.truncate_dim, prompt=args.prompt, prompt_name=args.prompt_name)
    except corpus.CorpusError as error:
        _fail(args.parser, str(error))
    finally:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    prompt = manifest["settings"]["prompt"]
    _rank0_print(f"{args.out}: {manifest['count']} texts -> embeddings.npy {manifest['shape']} {manifest['storage']}, "
                 f"ids.txt, offsets.npy, manifest.json; encoded in {manifest['precision']}"
                 + (f" (prompt {prompt!r} before each text)" if prompt else ""))


def search(args) -> None:
    from minilm import corpus, data

    if args.queries_file is not None:  # before loading the model: a bad file costs no time
        try:
            args.queries += [line for _, line in data.numbered_lines(args.queries_file) if line.strip()]
        except data.DataError as error:
            _fail(args.parser, f"--queries-file {error}")
    if not args.queries:
        _fail(args.parser, "no queries: pass query texts, or --queries-file with one query a line")
    try:
        _search(args, corpus.Corpus(args.dir))
    except corpus.CorpusError as error:  # a DIR damaged or edited, in a file read only now (ids.txt, offsets)
        _fail(args.parser, str(error))


def _search(args, data) -> None:
    from minilm import corpus

    manifest = data.manifest
    if args.rescore is not None and manifest["storage"] != "binary":
        _fail(args.parser, f"--rescore is for binary corpora; {args.dir} is {manifest['storage']}")
    if args.model:
        model = _load(args.parser, args.model, args.device, manifest["settings"]["max_seq_length"])
    else:  # manifests written before local folders were stored absolute name them relative to where encode ran
        model = _load(args.parser, manifest["model"], args.device, manifest["settings"]["max_seq_length"],
                      what=f"{Path(args.dir) / 'manifest.json'} names the model",
                      hint="; run search from the folder encode ran in, or pass --model")
    if corpus.model_fingerprint(model) != manifest["settings"]["model_fingerprint"]:
        _fail(args.parser, f"the model {args.model or manifest['model']} is not the one that encoded {args.dir} "
                           "(its weights or tokenizer differ); pass that model with --model")
    # The corpus's size and normalization; the query prompt: --query-prompt, else the model's "query" prompt
    queries = model.encode_query(args.queries, normalize=manifest["normalize"],
                                 precision=args.precision or manifest["precision"],
                                 truncate_dim=manifest["settings"]["truncate_dim"] or model.embedding_dim,
                                 prompt=args.query_prompt)
    indices, scores = data.search(queries, top_k=args.top_k, rescore=args.rescore)
    for query, rows, row_scores in zip(args.queries, indices.tolist(), scores.tolist()):
        print(f"\nquery: {query}")
        texts, ids = data.texts(rows), data.ids(rows)
        if texts and texts[0] is None:
            print(f"  ({manifest['input']['path']} is gone or changed since encoding: texts not shown)")
        for rank, (score, record_id, text) in enumerate(zip(row_scores, ids, texts), 1):
            text = None if text is None else _one_line(text)
            shown = "" if text is None else "  " + (text if len(text) <= 160 else text[:157] + "...")
            print(f"{rank:4d}. {score:.4f}  {_one_line(record_id)}{shown}")


def _one_line(text: str) -> str:
    """text with its control characters and line separators escaped as repr writes them: a hit is one line
    (a newline inside a JSONL text would split it, a carriage return would print the text over its rank)."""
    return "".join(repr(char)[1:-1] if unicodedata.category(char) in ("Cc", "Zl", "Zp") else char for char in text)


def _load(parser, name, device, max_seq_length=None, what="--model", hint=""):
    """The model, or one line naming `what` gave its name (a flag, or a manifest) and why it did not load."""
    import minilm

    from minilm.model import resolve_device

    try:
        resolve_device(device)
    except ValueError as error:
        _fail(parser, f"--device {device}: {error}")
    try:
        return minilm.load(name, device=device, max_seq_length=max_seq_length)
    except (OSError, ValueError) as error:
        if max_seq_length is not None and "max_seq_length" in str(error):
            _fail(parser, f"--max-seq-length {max_seq_length}: {error}")
        _fail(parser, f"{what} {name}: {error}{hint}")


def _rank0_print(message: str) -> None:
    if int(os.environ.get("RANK", "0")) == 0:
        print(message, flush=True)


def _fail(parser, message: str):
    """One line (no usage: the flags parsed), from one process (under torchrun every rank fails the same way),
    exit status 2."""
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"{parser.prog}: error: {message}", file=sys.stderr, flush=True)
    sys.exit(2)


def _add_encode(commands) -> None:
    """The encode command's flags."""
    p = commands.add_parser(
        "encode", help="embed every text of a file into DIR (streaming, resumable, shardable with torchrun)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Embed every text of INPUT into DIR, one window of texts at a time, so memory does not grow "
                    "with the corpus.\n\nDIR/embeddings.npy [count, dim] (np.load(..., mmap_mode='r')), "
                    "DIR/ids.txt (one id per row), DIR/offsets.npy (each row's byte offset in INPUT), "
                    "DIR/manifest.json.\nKilled at any point, the same command continues from the last window "
                    "written; the result is byte-identical to an uninterrupted run.\nUnder torchrun (any number "
                    "of processes and machines sharing DIR's filesystem) each process encodes its share of the "
                    "windows into the same files.\n\nInput: .jsonl (--field, --id-field), .tsv/.csv with a header "
                    "line (--column, --id-column), else plain text, one text per line (ids: line numbers; an empty "
                    "line is kept as the empty text). UTF-8; one record per line.",
        epilog="examples:\n  python -m minilm encode corpus.jsonl --field text --id-field _id --out emb\n"
               "  torchrun --nproc_per_node=4 -m minilm encode texts.txt --out emb --storage int8")
    p.add_argument("input", help="the texts: .txt (one per line), .jsonl, .tsv or .csv")
    p.add_argument("--out", required=True, metavar="DIR",
                   help="output directory (new, empty, or one this command started)")
    p.add_argument("--format", default="auto", choices=["auto", "text", "jsonl", "tsv", "csv"],
                   help="input format (default: by extension; anything not .jsonl/.json/.tsv/.csv is text)")
    p.add_argument("--field", "--column", dest="field", default=None,
                   help="JSONL field / TSV-CSV column holding the text (default: text)")
    p.add_argument("--id-field", "--id-column", dest="id_field", default=None,
                   help="JSONL field / TSV-CSV column holding the id (default: the record's line number)")
    p.add_argument("--model", default=MODEL, help="directory or hub id (default: %(default)s)")
    p.add_argument("--storage", default="float32", choices=list(STORAGES),
                   help="how embeddings.npy stores each row: float32, float16, int8 with per-dimension ranges "
                        "calibrated on the first --calibration-size texts (in the manifest), binary = 1 bit per "
                        "dimension (> 0), 8 per byte (default: float32)")
    p.add_argument("--dtype", default=None, help=argparse.SUPPRESS)  # its earlier name: refused, naming --storage
    p.add_argument("--calibration-size", type=int, default=1000,
                   help=f"--storage int8: texts from the start of INPUT to calibrate the per-dimension ranges on; "
                        f"at least {MIN_CALIBRATION}, since ranges from fewer clip the values of the other texts (on "
                        "STS-B, 47%% of values from 1 text, 2%% from 100, 0.1%% from 1000); an INPUT with fewer "
                        "texts is calibrated on all of them (default: %(default)s)")
    p.add_argument("--precision", default="fp32", choices=[*PRECISIONS, AUTO],
                   help="encode's precision: fp32, bf16/fp16 weights and activations, int8 Linears, or auto: the "
                        "fastest here within measured quality bands, recorded in the manifest as what ran "
                        "(default: fp32)")
    p.add_argument("--normalize", default=None, action=argparse.BooleanOptionalAction,
                   help="unit-length embeddings (default: as the model, Normalize in modules.json)")
    p.add_argument("--batch-size", type=int, default=32, help="encode batch size (default: %(default)s)")
    p.add_argument("--max-seq-length", type=int, default=None, help="truncate texts at this many tokens, a "
                   "prompt's included (default: the model's)")
    p.add_argument("--truncate-dim", type=int, default=None, metavar="N",
                   help="keep the first N dimensions of each embedding (a Matryoshka-trained model's smaller "
                        "embeddings: disk and search time shrink with N); unit length after the cut when "
                        "normalized. search cuts its queries the same (default: the model's truncate_dim, else all)")
    prompts = p.add_mutually_exclusive_group()
    prompts.add_argument("--prompt-name", default=None, metavar="NAME",
                         help="put the model's prompt NAME (config_sentence_transformers.json) before every text "
                              "(default: its \"document\", \"passage\" or \"corpus\" prompt, else its default "
                              "prompt, else none)")
    prompts.add_argument("--prompt", default=None, metavar="TEXT",
                         help="put TEXT before every text, e.g. \"passage: \" (\"\" for none)")
    p.add_argument("--window", type=int, default=10000,
                   help="texts read, length-sorted, encoded and written at a time; the unit of resume and of "
                        "sharding (default: %(default)s)")
    p.add_argument("--device", default=None, help="cpu, cuda, ... (default: CUDA when available; under "
                   "torchrun cuda:LOCAL_RANK)")
    p.add_argument("--overwrite", action="store_true",
                   help="start again in a DIR that holds another (or a finished) run of this command")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(run=encode, parser=p)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m minilm", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", metavar="{similarity,encode,search}")

    p = commands.add_parser("similarity", help="print the cosine similarity matrix of sentences (the default)",
                            description="Encode sentences and print their cosine similarities. Also the bare "
                                        "form: python -m minilm \"A man eats.\" \"Someone is eating.\"")
    p.add_argument("sentences", nargs="*", help=f"sentences to compare (default: {len(EXAMPLES)} examples)")
    p.add_argument("--model", default=MODEL, help="directory or hub id (default: %(default)s)")
    p.add_argument("--device", default=None, help="cpu, cuda, ... (default: CUDA when available)")
    p.set_defaults(run=similarity, parser=p)

    _add_encode(commands)

    p = commands.add_parser("search", help="print the top hits of queries in a DIR made by encode",
                            description="Encode the queries with DIR's model and print the exact top hits (score, "
                                        "id, text read back from INPUT), one line a hit: line breaks and other "
                                        "control characters in an id or text are shown escaped (\\n, \\t).")
    p.add_argument("dir", help="a finished DIR of python -m minilm encode")
    p.add_argument("queries", nargs="*", help="query texts")
    p.add_argument("--queries-file", default=None, metavar="FILE",
                   help="also search each line of FILE (UTF-8, one query a line, blank lines skipped)")
    p.add_argument("--top-k", type=int, default=10, help="hits per query (default: %(default)s)")
    p.add_argument("--rescore", type=int, default=None, metavar="M",
                   help="binary DIR: rescore the M * top-k best by Hamming distance with the float query "
                        "(suggested: 4). A binary DIR's scores are cosines of +-1 vectors: the query's and the "
                        "text's (1 - 2 * Hamming / dim), or with --rescore the float query's and the text's. They "
                        "rank like the float cosine but run lower than it")
    p.add_argument("--model", default=None, help="the model that encoded DIR (default: the manifest's)")
    p.add_argument("--query-prompt", default=None, metavar="TEXT",
                   help="put TEXT before every query, e.g. \"query: \" (default: the model's \"query\" prompt, "
                        "else its default prompt, else none). The queries are cut to DIR's --truncate-dim")
    p.add_argument("--precision", default=None, choices=[*PRECISIONS, AUTO],
                   help="how the queries are encoded (default: the precision DIR was encoded in). Another one "
                        "moves their scores by its rounding only: e.g. fp32 or auto on a CPU where DIR's is slow")
    p.add_argument("--device", default=None, help="cpu, cuda, ... (default: CUDA when available)")
    p.set_defaults(run=search, parser=p)
    return parser


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or (argv[0] not in COMMANDS and argv[0] not in ("-h", "--help")):
        argv = ["similarity", *argv]  # the bare form: python -m minilm "one sentence" "another"
    args = build_parser().parse_args(argv)
    if args.command == "search" and args.top_k < 1:
        _fail(args.parser, f"--top-k must be at least 1, not {args.top_k}")
    if args.command == "search" and args.rescore is not None and args.rescore < 1:
        _fail(args.parser, f"--rescore must be at least 1, not {args.rescore}")
    try:
        args.run(args)
    except InputError as error:  # e.g. a MINILM_ATTENTION/_POOLING/_LINEAR name that does not exist
        _fail(args.parser, str(error))
    except BrokenPipeError:
        # The reader of stdout is gone (search ... | head): stop quietly, as a tool ended by SIGPIPE does. stdout
        # goes to /dev/null first, else the flush at exit raises again and prints its own traceback.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(141)
    except KeyboardInterrupt:
        # encode marks a window done only once its rows are on disk: nothing written is lost.
        again = ("; rerun the same command to continue from the last window written" if args.command == "encode"
                 else "")
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"\n{args.parser.prog}: interrupted{again}", file=sys.stderr, flush=True)
        sys.exit(130)


if __name__ == "__main__":
    main()
