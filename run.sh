#!/usr/bin/env bash
# The main job: set up .venv (first run only), encode a few sentences, then fine-tune all-MiniLM-L6-v2 on the
# local STS-B training pairs (CosineSimilarityLoss, 1 epoch) and compare STS-B test Spearman before and after.
# Arguments are passed to train.py (for example --max-steps 50 for a quick run).
set -euo pipefail
cd "$(dirname "$0")"
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
echo; echo "== fine-tuning on STS-B train (CosineSimilarityLoss, batch 16, 1 epoch) -> $out"
python train.py --loss cosine --data "$data/stsb" --batch-size 16 --epochs 1 --lr 5e-5 --seed 42 \
  --eval-task stsb --eval-split dev --out "$out" --overwrite "$@"
echo; echo "== STS-B test after fine-tuning"
python eval.py --model "$out" --task stsb --data "$data/stsb" --json "$out/sts-test.json"
echo; echo "Model, model card (README.md), log.jsonl and loss.png are in $out"
