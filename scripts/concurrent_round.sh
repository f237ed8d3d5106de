#!/usr/bin/env bash
# The README's concurrent-drafting figures: bench/latency.py --concurrent on the fastest draft of
# scripts/frontier_cpu.sh (the unpruned target as a w8 draft) and on the best self-distilled one
# (drop 6), each at its recommended k / vocabulary / dtype, 16 MT-Bench first turns x 128 tokens,
# greedy, batch 1, on a quiet machine: ours target alone on 1 and on 2 threads, ours with the
# draft in turn, ours with the draft drafting concurrently on the other core.
#
#   bash scripts/concurrent_round.sh     # ~15 min after scripts/frontier_cpu.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"
for d in full30 drop6/sd drop3/sd; do
    [[ -f runs/speed/$d/specdec.json ]] || { echo "no runs/speed/$d: run scripts/speed_round.sh and scripts/frontier_cpu.sh first" >&2; exit 2; }
    name=concurrent-${d//\//-}
    OMP_NUM_THREADS=1 "$PY" bench/latency.py --draft "runs/speed/$d" --threads 1 --concurrent \
        --no-hf --prompts 16 --new-tokens 128 --repeats 1 --out "bench/results/$name.json" \
        "$@" | tee "bench/results/$name.log"
done
