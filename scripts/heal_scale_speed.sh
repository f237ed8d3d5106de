#!/usr/bin/env bash
# Healing at scale for the speed cuts (#11, #12): a cut (CUT=drop3 by default, or drop1) healed
# on N ShareGPT first turns (default 1,024, answers <= 192 tokens): SFT on their original
# answers and SD on the target's rewrites, one recipe (two epochs, the layers below the cut and
# the embedding frozen), only --data differs. SFT starts at once (`--data sharegpt --n N` selects
# the very records distill rewrites: specdec.turns.first_turns); vLLM distils on the other core
# (once for every cut), then SD heals there. Probes every 16 steps give the learning curves; the
# plot goes to docs/results/curve-$CUT-n$N.png.
#
#   bash scripts/heal_scale_speed.sh            # drop 3: ~30 min distilling, 25-40 min a heal
#   CUT=drop1 bash scripts/heal_scale_speed.sh  # drop 1 on the same distilled set
#   N=2048 bash scripts/heal_scale_speed.sh     # 25 min distilling the new 1,024, SFT 80 min, SD 57
#   N=4096 bash scripts/heal_scale_speed.sh     # all 3,425 usable turns: 30 min + ~2 h a heal (SD +10.6%)
#
# Resumable: the pruned draft and the distilled set are reused, distill resumes from
# <out>.partial (a larger N starts from the largest smaller set's records: the first N turns
# begin with the first M), the fine-tunes from <out>.ckpt/.
set -euo pipefail
cd "$(dirname "$0")/.."
P="${PYTHON:-.venv/bin/python}"
N="${N:-1024}"
CUT="${CUT:-drop3}"
H=runs/speed
D=$H/distilled-$N.jsonl
export OMP_NUM_THREADS=1

source scripts/speed_recipe.sh  # SPEED_PRUNE: the speed round's cuts
[[ $CUT == drop3 || $CUT == drop1 ]] || { echo "CUT must be drop3 or drop1, got '$CUT'" >&2; exit 2; }
# shellcheck disable=SC2086
[[ -f $H/$CUT/pruned/specdec.json ]] || \
    $P -m specdec.prune ${SPEED_PRUNE[$CUT]} --select angular --out $H/$CUT/pruned
R="--full --n $N --max-seq-len 384 --max-answer-tokens 192 --epochs 2 --batch-size 16 \
--micro-batch-size 8 --freeze-below-cut --freeze-embeddings --lr 1e-4 --eval-every 16 --eval-n 40 \
--eval-max-new-tokens 64"
ft() {  # ft METHOD DATA: one fine-tune, skipped once its checkpoint is complete
    local out=$H/$CUT/$1-n$N
    grep -qs '"stage": "finetune"' "$out/specdec.json" && return 0
    # shellcheck disable=SC2086
    $P -m specdec.finetune --draft $H/$CUT/pruned --data "$2" $R --out "$out" >> "$out.log" 2>&1
}
seed() {  # a larger N starts from a smaller run's records (the first N turns extend the first M)
    [[ -f $D || -f $D.partial ]] && return 0
    local m best=0
    for f in $H/distilled-*.jsonl; do
        m=${f##*-}; m=${m%.jsonl}
        [[ $m =~ ^[0-9]+$ ]] && (( m < N && m > best )) && best=$m
    done
    (( best > 0 )) && cp $H/distilled-$best.jsonl "$D.partial" && echo "distill: resuming from the $best records of $H/distilled-$best.jsonl"
    return 0
}
mkdir -p $H/$CUT
ft sft sharegpt &
seed
{ [[ -f $D ]] || $P -m specdec.distill --engine vllm --dtype float32 --n "$N" \
      --max-answer-tokens 192 --batch-size 128 --vllm-kv-cache-gib 3 --out "$D" > "$D.log" 2>&1
  ft sd "$D"; } &
wait
$P -m specdec.curves $H/$CUT/sft-n$N $H/$CUT/sd-n$N \
    --title "$CUT, 2 epochs over $N records" --out docs/results/curve-$CUT-n$N.png
echo "healed: $H/$CUT/{sft,sd}-n$N"
