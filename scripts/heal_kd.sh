#!/usr/bin/env bash
# A longer heal of a speed-round cut (#12; CUT=drop3 by default, or drop1): the speed round's
# recipe, four epochs instead of one, with dense KD from a cached top-32 logit cache (KL + TV,
# the target never runs during training) and the tied embedding / head frozen beside the layers
# below the cut. SFT and
# self-distilled differ only in --data (and their caches). Needs scripts/speed_round.sh's
# drafts and data. Resumable: caches and fine-tunes skip or resume when they have already run.
#
# KD=0: the same recipe without the KD terms (no cache needed), as `<method>-e$EPOCHS`.
#
#   bash scripts/heal_kd.sh                      # drop 3: ~40 min a draft on one core
#   CUT=drop1 METHODS=sd OMP_NUM_THREADS=2 bash scripts/heal_kd.sh   # drop 1, SD only
#   KD=0 bash scripts/heal_kd.sh                 # drop 3, cross-entropy only
set -euo pipefail
cd "$(dirname "$0")/.."
P="${PYTHON:-.venv/bin/python}"
H=runs/speed
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
EPOCHS="${EPOCHS:-4}"
CUT="${CUT:-drop3}"
SEL="--n 384 --max-seq-len 384 --max-answer-tokens 192"
R="--full $SEL --epochs $EPOCHS --batch-size 16 --micro-batch-size 8 --freeze-below-cut \
--freeze-embeddings --lr 1e-4 --eval-every 16 --eval-n 40 --eval-max-new-tokens 64"
KD="${KD:-1}"
suffix=kd$EPOCHS; (( KD )) || suffix=e$EPOCHS
for m in ${METHODS:-sd sft}; do
    data=$H/distilled-384.jsonl; [[ $m == sft ]] && data=$H/original-384.jsonl
    cache=${data%.jsonl}.logits
    kd=()
    if (( KD )); then
        [[ -f $cache/manifest.json ]] || \
            $P -m specdec.logit_cache --data "$data" $SEL --top-k 32 --out "$cache"
        kd=(--kd 1.0 --kd-tv 1.0 --kd-cache "$cache")
    fi
    out=$H/$CUT/$m-$suffix
    grep -qs '"stage": "finetune"' "$out/specdec.json" || \
        $P -m specdec.finetune --draft $H/$CUT/pruned --data "$data" "${kd[@]}" $R \
            --out "$out" > "$out.log" 2>&1
done
echo "healed: $H/$CUT/{${METHODS:-sd sft}}-$suffix"
