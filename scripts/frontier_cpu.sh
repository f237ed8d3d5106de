#!/usr/bin/env bash
# The README's CPU frontier: the drafts of scripts/speed_round.sh (keep 12, drop 6, drop 3,
# drop 1: pruned, SFT, self-distilled; scripts/heal_kd.sh's + KD ones, scripts/heal_regen.sh's
# sd-regen ones) plus the unpruned target as a quantization-only reference, each in the draft
# dtypes $DTYPES (default fp32 and w8: int8 weights on the rowmm kernel), on a quiet machine
# (nothing else running), writing each draft's recommended settings; then bench/latency.py on
# the fastest draft with those settings. Results: bench/results/$NAME*.
#
#   THREADS=1 bash scripts/frontier_cpu.sh [extra bench/frontier.py flags]   # ~40 min
#   DTYPES=fp32,int8 NAME=frontier-int8 SPECDEC_ROWMM=0 THREADS=1 bash scripts/frontier_cpu.sh
#     (the 2026-12-03 int8 run, before the rowmm kernel)
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"
H=runs/speed
NAME="${NAME:-frontier-cpu}"
args=()
# DRAFTS: the drafts under runs/speed/ to measure (those not made yet are left out)
DRAFTS="${DRAFTS:-keep12/pruned keep12/sft keep12/sd keep12/sd-regen drop6/pruned drop6/sft \
drop6/sd drop6/sd-regen drop3/pruned drop3/sft drop3/sd drop3/sd-regen drop3/sft-kd4 drop3/sd-kd4 \
drop1/pruned drop1/sft drop1/sd drop1/sd-regen drop1/sft-kd4 drop1/sd-kd4}"
for d in $DRAFTS; do
    [[ -f "$H/$d/specdec.json" ]] && args+=(--draft "${d/\//-}=$H/$d")
done
if (( ${#args[@]} == 0 )); then
    echo "no drafts under $H/: make them with bash scripts/speed_round.sh first" >&2
    exit 2
fi
if [[ ! -f $H/full30/config.json ]]; then  # the target itself, as a draft (hard-linked weights)
    src=$("$PY" -c "from specdec.models import resolve_model; print(resolve_model('smollm2-135m-instruct'))")
    mkdir -p $H/full30
    for f in "$src"/*; do
        [[ $(basename "$f") == model.safetensors ]] && ln -f "$f" $H/full30/ || cp "$f" $H/full30/
    done
fi
args+=(--draft "unpruned target:full30=$H/full30")
"$PY" bench/frontier.py "${args[@]}" --draft-dtypes "${DTYPES:-fp32,w8}" \
    --vocab-data $H/distilled-384.jsonl --vocab-n 0,8192 --ks 1,2,3,4 --n 40 \
    --max-new-tokens 64 --threads "${THREADS:-2}" --e2e-best "${E2E_BEST:-3}" --e2e-prompts 16 \
    --new-tokens 128 --write-recommended --out "bench/results/$NAME" "$@" \
    | tee "bench/results/$NAME.log"
best=$("$PY" -c "import json; r = json.load(open('bench/results/$NAME/frontier.json')); \
rows = [x for x in r['rows'] if 'measured_speedup' in x]; \
print(max(rows, key=lambda x: x['measured_speedup'])['path'])")
"$PY" bench/latency.py --draft "$best" --threads "${THREADS:-2}" --prompts 16 --new-tokens 128 \
    --repeats 1 --out "bench/results/$NAME-latency.json" | tee "bench/results/$NAME-latency.log"
