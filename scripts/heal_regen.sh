#!/usr/bin/env bash
# Self-distillation on the target's own answers (#12): the target answers the speed round's 384
# prompts alone (`--mode regenerate`, greedy with no penalty -- the decoding it is served with --
# then one sampled retry at T 0.7 / top-p 0.9), and each speed-round cut is healed on those
# answers with exactly the recipe its `sd` and `sft` drafts got (scripts/speed_recipe.sh; only
# --data differs), as `<cut>/sd-regen`. Needs scripts/speed_round.sh's pruned drafts and
# original-384.jsonl (the prompts), and .venv-vllm (bash scripts/install_vllm.sh). Resumable:
# the distillation continues from its partial output, a finished fine-tune is skipped.
#
#   bash scripts/heal_regen.sh            # ~28 min distillation on one core, then drop 3 and drop 1
#   CUTS="keep12 drop6" bash scripts/heal_regen.sh   # other cuts; ~10-15 min a cut, two at a time
set -euo pipefail
cd "$(dirname "$0")/.."
P="${PYTHON:-.venv/bin/python}"
H=runs/speed
G=$H/regen-384.jsonl
export OMP_NUM_THREADS=1

[[ -f $G ]] || $P -m specdec.distill --engine vllm --dtype float32 --data $H/original-384.jsonl \
    --n all --mode regenerate --frequency-penalty 0 --retry-mode regenerate \
    --retry-temperature 0.7 --retry-top-p 0.9 --retry-frequency-penalty 0 \
    --max-answer-tokens 192 --batch-size 128 --vllm-kv-cache-gib 3 --out $G

source scripts/speed_recipe.sh  # SPEED_R, SPEED_CUT: the speed round's recipe per cut
ft() {  # ft CUT: the cut's sd recipe on the regenerated answers, skipped once complete
    local out=$H/$1/sd-regen
    grep -qs '"stage": "finetune"' "$out/specdec.json" && return 0
    # shellcheck disable=SC2086
    $P -m specdec.finetune $SPEED_R ${SPEED_CUT[$1]} --draft $H/$1/pruned --data $G \
        --out "$out" > "$out.log" 2>&1
}
cuts=(${CUTS:-drop3 drop1})
for ((i = 0; i < ${#cuts[@]}; i += 2)); do  # two fine-tunes at a time, one core each
    ft "${cuts[i]}" &
    [[ -n ${cuts[i + 1]:-} ]] && ft "${cuts[i + 1]}" &
    wait
done
for c in "${cuts[@]}"; do
    grep -qs '"stage": "finetune"' "$H/$c/sd-regen/specdec.json" || \
        { echo "heal_regen: $c failed, see $H/$c/sd-regen.log; rerun to resume" >&2; exit 1; }
done
echo "healed on the target's own answers: $H/{${cuts[*]}}/sd-regen"
