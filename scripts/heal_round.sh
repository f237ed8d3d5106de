#!/usr/bin/env bash
# The README's second healing round: rewrites with the answer-only frequency penalty, then one
# recipe per cut -- keep 12: SFT, SD (two seeds), their SLERP merge, SD with LoRA, SFT and SD
# over 3 epochs; drop 6: SFT and SD -- and the teacher-forced scores of the keep-12 drafts.
# Every stage skips or resumes when it has already run, so the script can be rerun after an
# interruption.
#
#   bash scripts/heal_round.sh            # ~90 min on a 2-core box with .venv-vllm
#
# One fine-tune at a time on one thread (vLLM, when distilling, pins itself to the other core).
set -euo pipefail
cd "$(dirname "$0")/.."
P="${PYTHON:-.venv/bin/python}"
H=runs/heal2
D=$H/distilled-384.jsonl
O=$H/original-384.jsonl
export OMP_NUM_THREADS=1

[[ -f runs/fr/keep12/pruned/specdec.json ]] || \
    $P -m specdec.prune --keep 12 --start 3 --select angular --out runs/fr/keep12/pruned
[[ -f runs/fr/drop6/pruned/specdec.json ]] || \
    $P -m specdec.prune --drop 6 --start 12 --select angular --out runs/fr/drop6/pruned
[[ -f $D ]] || $P -m specdec.distill --engine vllm --dtype bfloat16 --n 384 \
    --max-answer-tokens 192 --batch-size 128 --vllm-kv-cache-gib 3 --out $D
[[ -f $O ]] || $P -c "from pathlib import Path; from specdec.pipeline import write_original; \
write_original(Path('$D'), Path('$O'))"

R="--bf16 --n 384 --epochs 1 --batch-size 16 --micro-batch-size 8 --max-seq-len 384 \
--max-answer-tokens 192 --freeze-below-cut --eval-every 8 --eval-n 40 --eval-max-new-tokens 64"
ft() {  # ft OUT ARGS...: one fine-tune (ARGS after the recipe, so they override it), skipped
        # once its checkpoint is complete
    local out=$1; shift
    grep -qs '"stage": "finetune"' "$out/specdec.json" && return 0
    mkdir -p "$(dirname "$out")"
    $P -m specdec.finetune $R "$@" --out "$out" > "$out.log" 2>&1
}
K=runs/fr/keep12/pruned
ft $H/keep12/sd-s0 --draft $K --data $D --full --lr 3e-4 --seed 0
ft $H/keep12/sd-s1 --draft $K --data $D --full --lr 3e-4 --seed 1
ft $H/keep12/sft --draft $K --data $O --full --lr 3e-4
ft $H/keep12/sd-lora --draft $K --data $D --lora --lr 2e-3
[[ -f $H/keep12/sd-slerp/specdec.json ]] || $P -m specdec.merge --a $H/keep12/sd-s0 \
    --b $H/keep12/sd-s1 --t 0.5 --out $H/keep12/sd-slerp
ft $H/keep12/sd-3ep --draft $K --data $D --full --lr 3e-4 --epochs 3   # the same, 3 epochs
ft $H/keep12/sft-3ep --draft $K --data $O --full --lr 3e-4 --epochs 3
ft $H/drop6/sft --draft runs/fr/drop6/pruned --data $O --full --lr 1e-4
ft $H/drop6/sd --draft runs/fr/drop6/pruned --data $D --full --lr 1e-4
$P -m specdec.evaluate --n 40 --max-new-tokens 64 --out $H/keep12/evaluate.json \
    --draft sd-s0=$H/keep12/sd-s0 --draft sd-s1=$H/keep12/sd-s1 \
    --draft sd-slerp=$H/keep12/sd-slerp --draft sd-lora=$H/keep12/sd-lora \
    --draft sft=$H/keep12/sft
$P -m specdec.curves $H/keep12/sft $H/keep12/sd-s0 $H/keep12/sd-lora \
    --title "keep 12, answer-penalty rewrites" --out docs/results/curve-keep12-round2.png
$P -m specdec.curves $H/drop6/sft $H/drop6/sd \
    --title "drop 6, answer-penalty rewrites" --out docs/results/curve-drop6-round2.png
$P -m specdec.curves $H/keep12/sft-3ep $H/keep12/sd-3ep \
    --title "keep 12, 3 epochs over 384 records" --out docs/results/curve-keep12-3ep.png
