#!/usr/bin/env bash
# The main job: set up .venv (first run only), encode a few sentences, fine-tune all-MiniLM-L6-v2 on the local
# STS-B training pairs (CosineSimilarityLoss, 1 epoch) and compare STS-B test Spearman before and after, then embed
# the STS-B test sentences with the fine-tuned model to an int8 corpus on disk and search it.
# Arguments are passed to train.py (for example --max-steps 50 for a quick run). ./run.sh --help (or -h): this text
# and train.py's flags, running nothing.
set -euo pipefail
cd "$(dirname "$0")"
for arg in "$@"; do
  if [ "$arg" = --help ] || [ "$arg" = -h ]; then
    # Before setup.sh: help must not install anything, so train.py's flags come only from a .venv already there.
    awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"
    echo
    if [ -x .venv/bin/python ]; then
      echo "train.py's flags (run.sh passes its arguments to train.py):"
      .venv/bin/python train.py --help
    else
      echo "train.py's flags (run.sh passes its arguments to train.py) need its environment, which is not set up"
      echo "yet: run bash scripts/setup.sh (or ./run.sh), then ./run.sh --help lists them."
    fi
    exit 0
  fi
done
bash scripts/setup.sh
. .venv/bin/activate
python -m minilm

data=${MINILM_DATA:-../shared/data}
if [ ! -d "$data/stsb" ]; then
  echo "No STS-B data in $data/stsb (set MINILM_DATA to the folder holding stsb/): skipping the fine-tuning run."
  exit 0
fi
out=runs/stsb-cosine
echo; echo "== STS-B test before fine-tuning"
python eval.py --model sentence-transformers/all-MiniLM-L6-v2 --task stsb --data "$data/stsb"
echo; echo "== fine-tuning on STS-B train (CosineSimilarityLoss, batch 16, 1 epoch, best dev step kept) -> $out"
# loss.png: the loss every 10 steps, the dev Spearman every 60, and the step kept (--load-best)
python train.py --loss cosine --data "$data/stsb" --batch-size 16 --epochs 1 --lr 5e-5 --seed 42 \
  --eval-task stsb --eval-split dev --log-steps 10 --eval-steps 60 --load-best --out "$out" --overwrite "$@"
echo; echo "== STS-B test after fine-tuning"
# beside the run folder, not in it: --overwrite replaces only what a run wrote itself
python eval.py --model "$out" --task stsb --data "$data/stsb" --json "$out.sts-test.json"
echo; echo "== embed the STS-B test sentences with the fine-tuned model (int8 output) and search them"
cut -f6,7 "$data/stsb/test.tsv" | tr '\t' '\n' | sed 's/[[:space:]]*$//' | LC_ALL=C sort -u > runs/stsb-test-sentences.txt
python -m minilm encode runs/stsb-test-sentences.txt --model "$out" --storage int8 --out "$out.corpus" \
  --overwrite --no-progress
python -m minilm search "$out.corpus" "A man is playing a guitar." "Stocks fell sharply." --top-k 3
echo; echo "Model, model card (README.md), log.jsonl and loss.png are in $out; the embedded corpus in $out.corpus"
