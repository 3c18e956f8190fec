"""The texts recipe 005 distils on: every distinct text of ../shared/data's training material, one per line.

    python recipes/distill_sentences.py ../shared/data --out runs/data/distill_sentences.txt

Sources, in this order (a text seen before is not repeated):
  scifact/corpus.jsonl      every document, as the retrieval evaluator embeds it (title + " " + text)
  quora/duplicates.tsv      both questions of the pairs recipe 001 trains on (recipes/split_pairs.py's split: the
                            held-out 10% stays unseen)
  stsb/train.tsv            both sentences of every training pair (dev and test unseen)
  snli/snli_1.0_dev.jsonl.gz  premise and hypothesis of every pair with a gold label (the test file unseen)
No test split is read. A line break inside a text becomes a space, so that each line
of the output is one text; blank texts are left out. The file is written whole (a temporary file renamed into
place), and an existing --out is replaced only with --overwrite.
"""

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "recipes"))

from minilm import data, evaluation, files  # noqa: E402
from split_pairs import split  # noqa: E402


def sources(root: Path) -> dict:
    """name -> the texts of each source, in file order."""
    corpus = evaluation.read_corpus(root / "scifact" / "corpus.jsonl")
    quora = data.read_dataset(root / "quora" / "duplicates.tsv").rows
    quora_train, _ = split([(row["anchor"], row["positive"]) for row in quora], 0.1)  # recipe 001's split
    stsb = data.load_stsb(root / "stsb", "train")
    snli = data.load_snli(root / "snli" / "snli_1.0_dev.jsonl.gz")
    return {
        "scifact corpus": list(corpus.values()),
        "quora (recipe 001's training pairs)": [text for pair in quora_train for text in pair],
        "stsb train": [row[column] for row in stsb for column in ("sentence1", "sentence2")],
        "snli dev": [row[column] for row in snli for column in ("premise", "hypothesis")],
    }


def distinct_texts(named_sources: dict) -> tuple:
    """-> (texts in first-seen order, one line each; {source: how many new texts it added})."""
    seen, added = {}, {}
    for name, texts in named_sources.items():
        before = len(seen)
        for text in texts:
            text = " ".join(text.splitlines()).strip()  # every line break Python knows, so each text is one line
            if text:
                seen.setdefault(text, None)
        added[name] = len(seen) - before
    return list(seen), added


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="distill_sentences.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("data", help="the shared data folder (holding scifact/, quora/, stsb/, snli/)")
    parser.add_argument("--out", required=True, help="the text file to write, one text per line")
    parser.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    args = parser.parse_args(argv)
    out = Path(args.out)
    if out.exists() and (out.is_dir() or not args.overwrite):
        print(f"distill_sentences.py: error: --out {out} exists; " + ("it is a folder, give a file" if out.is_dir()
              else "add --overwrite to replace it"), file=sys.stderr)
        return 2
    try:
        texts, added = distinct_texts(sources(Path(args.data)))
    except (OSError, data.DataError) as error:
        print(f"distill_sentences.py: error: {error}", file=sys.stderr)
        return 2
    out.parent.mkdir(parents=True, exist_ok=True)
    files.write_text(out, "".join(text + "\n" for text in texts))
    print(f"{len(texts)} texts -> {out} (" + ", ".join(f"{name}: {count}" for name, count in added.items()) + ")")
    return 0


if __name__ == "__main__":
    sys.exit(main())
