#!/usr/bin/env bash
# A longer heal of the drop-3 cut (#12): the speed round's recipe, four epochs instead of one,
# with dense KD from a cached top-32 logit cache (KL + TV, the target never runs during
# training) and the tied embedding / head frozen beside the layers below the cut. SFT and
# self-distilled differ only in --data (and their caches). Needs scripts/speed_round.sh's
# drafts and data. Resumable: caches and fine-tunes skip or resume when they have already run.
#
#   bash scripts/heal_drop3.sh        # ~50 min on one core of a 2-core box
set -euo pipefail
cd "$(dirname "$0")/.."
P="${PYTHON:-.venv/bin/python}"
H=runs/speed
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
EPOCHS="${EPOCHS:-4}"
SEL="--n 384 --max-seq-len 384 --max-answer-tokens 192"
R="--full $SEL --epochs $EPOCHS --batch-size 16 --micro-batch-size 8 --freeze-below-cut \
--freeze-embeddings --lr 1e-4 --kd 1.0 --kd-tv 1.0 --eval-every 16 --eval-n 40 --eval-max-new-tokens 64"
for m in sd sft; do
    data=$H/distilled-384.jsonl; [[ $m == sft ]] && data=$H/original-384.jsonl
    cache=${data%.jsonl}.logits
    [[ -f $cache/manifest.json ]] || \
        $P -m specdec.logit_cache --data "$data" $SEL --top-k 32 --out "$cache"
    out=$H/drop3/$m-kd$EPOCHS
    grep -qs '"stage": "finetune"' "$out/specdec.json" || \
        $P -m specdec.finetune --draft $H/drop3/pruned --data "$data" --kd-cache "$cache" $R \
            --out "$out" > "$out.log" 2>&1
done
echo "drop-3 heal: $H/drop3/sd-kd$EPOCHS $H/drop3/sft-kd$EPOCHS"
