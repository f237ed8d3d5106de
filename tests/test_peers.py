"""bench/peers.py mechanics: the vLLM settings grid, the command and environment each vLLM run
gets (through a stand-in interpreter that answers like `specdec.vllm generate --json`), a
failed run reported and skipped, and the ratios of the summary. No timing is asserted."""

from __future__ import annotations

import importlib.util
import json
import statistics
import sys
from pathlib import Path

import pytest
from rich.console import Console

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def peers():
    sys.path.insert(0, str(ROOT / "bench"))
    spec = importlib.util.spec_from_file_location("bench_peers", ROOT / "bench" / "peers.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_peers"] = module
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop("bench_peers", None)


def test_grid_parses_and_bad_entries_name_the_form(peers):
    grid = peers.parse_grid("float32:auto:compiled, bfloat16:0-1:eager")
    assert [s.name for s in grid] == ["vllm fp32 bind=auto compiled", "vllm bf16 bind=0-1 eager"]
    assert peers.parse_grid("") == []
    for bad in ("float16:auto:eager", "float32:auto", "float32:auto:fast", "float32::eager"):
        with pytest.raises(ValueError, match="DTYPE:BIND:MODE"):
            peers.parse_grid(bad)
    with pytest.raises(ValueError, match="--ours"):
        peers.validate(peers.PeersConfig(ours="fp8"))


FAKE_VLLM = """#!{python}
import json, os, sys
args = sys.argv[1:]
log = {log!r}
with open(log, "a") as f:
    f.write(json.dumps({{"argv": args, "bind": os.environ.get("VLLM_CPU_OMP_THREADS_BIND"),
                         "reserved": os.environ.get("VLLM_CPU_NUM_OF_RESERVED_CPU")}}) + "\\n")
dtype = args[args.index("--dtype") + 1]
if dtype == "bfloat16" and "--enforce-eager" in args:
    sys.exit("vLLM said no")
n = int(args[args.index("-n") + 1])
out = {{"vllm_version": "0.0-test", "seconds": {{"init": 3.0}},
        "outputs": [{{"token_ids": [7, i], "seconds": 0.5}} for i in range(n)]}}
open(args[args.index("--json") + 1], "w").write(json.dumps(out))
"""


def test_vllm_runs_get_their_settings_and_failures_are_skipped(peers, tmp_path):
    log = tmp_path / "calls.jsonl"
    fake = tmp_path / "python"
    fake.write_text(FAKE_VLLM.format(python=sys.executable, log=str(log)))
    fake.chmod(0o755)
    cfg = peers.PeersConfig(prompts=2, new_tokens=4, vllm_python=str(fake))
    console = Console(file=open(tmp_path / "console.txt", "w"))
    ok = peers.run_vllm(cfg, str(fake), peers.Setting("float32", "0-1", "compiled"), console)
    bad = peers.run_vllm(cfg, str(fake), peers.Setting("bfloat16", "auto", "eager"), console)
    calls = [json.loads(x) for x in log.read_text().splitlines()]
    assert calls[0]["argv"][:3] == ["-m", "specdec.vllm", "generate"]
    assert {"--batch1", "--ignore-eos", "--no-enforce-eager"} <= set(calls[0]["argv"])
    assert (calls[0]["bind"], calls[0]["reserved"]) == ("0-1", "0")
    assert (calls[1]["bind"], calls[1]["reserved"]) == ("auto", None)  # vLLM's own default
    assert "--enforce-eager" in calls[1]["argv"]
    assert ok["seconds"] == [0.5, 0.5] and ok["tokens"] == [[7, 0], [7, 1]]
    assert ok["init_s"] == 3.0 and ok["dtype"] == "fp32"
    assert bad["failed"] and "vLLM said no" in bad["error"]

    ours = {"name": "ours fp32", "dtype": "fp32", "seconds": [1.0, 0.25],
            "tokens": [[7, 0], [9, 9]], "init_s": None}
    rows = peers.summarize(cfg, [ours, ok, bad])
    assert rows[0]["tok_s"] == pytest.approx(statistics.median([4 / 1.0, 4 / 0.25]))
    assert rows[1]["tok_s"] == pytest.approx(8.0)
    assert rows[1]["vs_ours"] == pytest.approx(statistics.median([1.0 / 0.5, 0.25 / 0.5]))
    assert rows[1]["tokens_match"] == 0.5 and rows[2] == {"name": bad["name"], "failed": True}
    line = peers.summary_line(rows)
    assert line["vllm_best_fp32"] == ok["name"] and line["vllm_best_fp32_tok_s"] == 8.0
    assert line["ours_vs_vllm_best_fp32"] == pytest.approx(round(rows[0]["tok_s"] / 8.0, 3))
    assert "vllm_best_bf16" not in line
