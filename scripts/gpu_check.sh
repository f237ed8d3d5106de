#!/usr/bin/env bash
# The one check a session that is lent a GPU runs (at most 10 minutes):
#   1. compiled Triton parity: pytest -m gpu (the kernels against their torch references);
#   2. bench/kernels.py at the 8B shapes: vocab 128,256, k 1..8, batch 1..64, bf16, kernel vs
#      torch path and achieved bandwidth;
#   3. the engine on CUDA with the rehearsal target (llama-3.1-8b-rehearsal, a draft cut from
#      it): greedy speculative output identical to the target alone.
# Writes gpu_check.json (one object: each step's status, seconds and figures) and
# gpu_check.log under $OUT when set, else runs/gpu_check/.
#
#   bash scripts/gpu_check.sh            # on the GPU box
#   bash scripts/gpu_check.sh --dry-run  # here, on the CPU: every piece found, what can run runs
#
# The GPU box reaches no network: it needs the venv, and a $SPECDEC_CACHE holding the Llama-3
# tokenizer source (`python -m specdec.hub fetch llama3-tokenizer`, 2 MB); the rehearsal
# target is built from it there (random weights, seconds).
set -uo pipefail
cd "$(dirname "$0")/.."

DRY=0
[[ "${1:-}" == "--dry-run" ]] && DRY=1
PY=${PYTHON:-.venv/bin/python}
[[ -x "$PY" ]] || PY=python3
OUT_DIR=${OUT:-runs/gpu_check}
mkdir -p "$OUT_DIR"
OUT_DIR=$(cd "$OUT_DIR" && pwd)
LOG="$OUT_DIR/gpu_check.log"
: >"$LOG"
STEPS="$OUT_DIR/.steps.jsonl"
: >"$STEPS"
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}

step() {  # step NAME TIMEOUT_S CMD...: run, log, record status and seconds
    local name=$1 limit=$2
    shift 2
    local start end rc
    start=$(date +%s.%N)
    echo "=== $name: $*" | tee -a "$LOG"
    timeout "$limit" "$@" >>"$LOG" 2>&1
    rc=$?
    end=$(date +%s.%N)
    tail -n 3 "$LOG"
    "$PY" -c 'import json,sys; print(json.dumps({"step": sys.argv[1], "rc": int(sys.argv[2]),
        "ok": sys.argv[2] == "0", "seconds": round(float(sys.argv[4]) - float(sys.argv[3]), 1)}))' \
        "$name" "$rc" "$start" "$end" >>"$STEPS"
}

if [[ $DRY == 1 ]]; then
    export TRITON_INTERPRET=1
    for f in bench/kernels.py tests/test_kernels.py scripts/gpu_engine_check.py; do
        [[ -f $f ]] || { echo "missing $f" | tee -a "$LOG"; exit 1; }
    done
    step "gpu tests collected" 120 "$PY" -P -m pytest -q -m gpu --collect-only tests/test_kernels.py
    # the interpreter runs the Triton path too: every row checked against torch, batch 2
    # included (strided rows of the target's logits)
    step "kernel bench (cpu, interpreter, small shapes)" 300 "$PY" bench/kernels.py --device cpu \
        --vocab 4096 --batches 1,2 --ks 1,4 --repeats 1 --warmup 0 \
        --out "$OUT_DIR/kernels.json"
    step "engine check (cpu, rehearsal target)" 300 "$PY" scripts/gpu_engine_check.py \
        --device cpu --prompts 2 --max-tokens 8 --out "$OUT_DIR/engine.json"
else
    export TRITON_INTERPRET=0
    "$PY" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)' || {
        echo "no CUDA device: run with --dry-run here" | tee -a "$LOG"; exit 1; }
    nvidia-smi >>"$LOG" 2>&1
    step "triton parity (pytest -m gpu)" 180 "$PY" -P -m pytest -q -m gpu tests/test_kernels.py
    step "kernel bench (8B shapes, bf16)" 240 "$PY" bench/kernels.py --device cuda \
        --vocab 128256 --batches 1,8,32,64 --ks 1,2,4,8 --dtype bf16 \
        --out "$OUT_DIR/kernels.json"
    step "engine check (cuda, rehearsal target)" 150 "$PY" scripts/gpu_engine_check.py \
        --device cuda --prompts 8 --max-tokens 64 --out "$OUT_DIR/engine.json"
fi

"$PY" - "$OUT_DIR" "$DRY" <<'EOF'
import json, os, sys
from pathlib import Path
out, dry = Path(sys.argv[1]), sys.argv[2] == "1"
steps = [json.loads(x) for x in (out / ".steps.jsonl").read_text().splitlines() if x]
result = {"dry_run": dry, "ok": all(s["ok"] for s in steps), "steps": steps}
for name in ("kernels", "engine"):
    f = out / f"{name}.json"
    if f.is_file():
        data = json.loads(f.read_text())
        result[name] = data if name == "engine" else {
            "triton_timed": data.get("triton_timed"), "rows": data.get("rows")}
tmp = out / ".gpu_check.json.tmp"
tmp.write_text(json.dumps(result, indent=2) + "\n")
os.replace(tmp, out / "gpu_check.json")
(out / ".steps.jsonl").unlink()
print(json.dumps({"gpu_check": "dry-run" if dry else "gpu", "ok": result["ok"],
                  "out": str(out / "gpu_check.json")}))
sys.exit(0 if result["ok"] else 1)
EOF
