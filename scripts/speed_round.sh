#!/usr/bin/env bash
# The drafts of the README's "int8 drafts" frontier, made on an AVX2-only CPU (fp32 throughout:
# no native bf16 there): prune drop 6, keep 12, drop 3 and drop 1, distill 384 ShareGPT first turns with vLLM
# in fp32, heal SFT and self-distilled drafts with one recipe per cut. Every stage skips or
# resumes when it has already run, so the script can be rerun after an interruption.
#
#   bash scripts/speed_round.sh            # ~40 min on a 2-core box (installs .venv-vllm first)
#
# One thread per job: vLLM pins itself to one core; then two fine-tunes run side by side.
set -euo pipefail
cd "$(dirname "$0")/.."
P="${PYTHON:-.venv/bin/python}"
H=runs/speed
D=$H/distilled-384.jsonl
O=$H/original-384.jsonl
export OMP_NUM_THREADS=1

bash scripts/install_vllm.sh
source scripts/speed_recipe.sh  # SPEED_PRUNE, SPEED_R, SPEED_CUT
prune() {  # prune CUT: the speed round's cut, skipped once written
    # shellcheck disable=SC2086
    [[ -f $H/$1/pruned/specdec.json ]] || \
        $P -m specdec.prune ${SPEED_PRUNE[$1]} --select angular --out $H/$1/pruned
}
prune keep12
prune drop6
prune drop3
[[ -f $D ]] || $P -m specdec.distill --engine vllm --dtype float32 --n 384 \
    --max-answer-tokens 192 --batch-size 128 --vllm-kv-cache-gib 3 --out $D
[[ -f $O ]] || $P -c "from pathlib import Path; from specdec.pipeline import write_original; \
write_original(Path('$D'), Path('$O'))"

ft() {  # ft CUT METHOD DATA: one fine-tune, skipped once its checkpoint is complete
    local out=$H/$1/$2
    grep -qs '"stage": "finetune"' "$out/specdec.json" && return 0
    mkdir -p "$(dirname "$out")"
    # shellcheck disable=SC2086
    $P -m specdec.finetune $SPEED_R ${SPEED_CUT[$1]} --draft $H/$1/pruned --data "$3" \
        --out "$out" > "$out.log" 2>&1
}
# two chains side by side, one core each
{ ft drop6 sd $D
  ft drop6 sft $O; } &
{ ft keep12 sd $D
  ft keep12 sft $O; } &
wait
# a shallow cut (added on the afternoon of 2026-12-03, for concurrent drafting)
ft drop3 sd $D &
ft drop3 sft $O &
wait
# the shallowest cut, one layer (added late on 2026-12-03, when the frontier favoured it): two
# epochs, the embedding frozen too, so its 25 bottom layers stay the target's and the engine
# takes their prefill from the target's (forward.shared_layers)
prune drop1
ft drop1 sd $D &
ft drop1 sft $O &
wait
echo "speed round: drafts ready under $H"
