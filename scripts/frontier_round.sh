#!/usr/bin/env bash
# The README's frontier run: every draft of the healing run under runs/fr/ that exists, on a
# quiet machine (nothing else running), writing each draft's recommended settings.
#
#   bash scripts/frontier_round.sh [extra bench/frontier.py flags]
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"
args=()
for d in keep8/pruned keep12/pruned keep12/sft keep12/sd keep12/sd-kd keep18/pruned \
         drop6/pruned drop6/sft drop6/sd drop6/sd-kd; do
    [[ -f "runs/fr/$d/specdec.json" ]] && args+=(--draft "${d/\//-}=runs/fr/$d")
done
if (( ${#args[@]} == 0 )); then
    echo "no drafts under runs/fr/: make them with the README's healing commands first" >&2
    exit 2
fi
"$PY" bench/frontier.py "${args[@]}" --vocab-data runs/heal/distilled-384.jsonl \
    --vocab-n 0,4096,8192,16384 --ks 1,2,3,4 --n 40 --max-new-tokens 64 --threads 2 \
    --e2e-best 1 --e2e-prompts 16 --new-tokens 128 --write-recommended \
    --out bench/results/frontier "$@"
