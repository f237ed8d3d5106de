"""specdec.merge: SLERP endpoints and geometry, near-parallel fallback, mismatch errors, CLI."""

import math
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from specdec import merge
from specdec.merge import MergeConfig, MergeError, slerp
from specdec.models import read_manifest
from conftest import save_tiny_chat_model


def test_slerp_endpoints_and_geometry():
    torch.manual_seed(0)
    a, b = torch.randn(7, 5), torch.randn(7, 5)
    assert torch.equal(slerp(a, b, 0.0)[0], a) and torch.equal(slerp(a, b, 1.0)[0], b)
    # orthogonal unit vectors: the midpoint stays on the unit circle, at 45 degrees to both
    e0, e1 = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    mid, linear = slerp(e0, e1, 0.5)
    assert not linear
    torch.testing.assert_close(mid, torch.tensor([1.0, 1.0]) / math.sqrt(2))
    quarter, _ = slerp(e0, e1, 1 / 3)
    torch.testing.assert_close(quarter, torch.tensor([math.cos(math.pi / 6),
                                                      math.sin(math.pi / 6)]))
    half = slerp(a.to(torch.bfloat16), b.to(torch.bfloat16), 0.5)[0]
    assert half.dtype == torch.bfloat16 and half.shape == a.shape


def test_near_parallel_and_zero_tensors_fall_back_to_linear():
    a = torch.randn(64)
    for b in (2.0 * a, a + 1e-7 * torch.randn(64), torch.zeros(64)):
        out, linear = slerp(a, b, 0.25)
        assert linear
        torch.testing.assert_close(out, 0.75 * a + 0.25 * b)
    with pytest.raises(MergeError, match="shapes"):
        slerp(torch.zeros(3), torch.zeros(4), 0.5)


@pytest.fixture(scope="module")
def drafts(tmp_path_factory):
    root = tmp_path_factory.mktemp("drafts")
    return {
        "a": save_tiny_chat_model(root / "a", seed=1, manifest={"stage": "t", "target": "T"}),
        "b": save_tiny_chat_model(root / "b", seed=2),
        "deeper": save_tiny_chat_model(root / "deeper", seed=3, num_layers=3),
        "wider": save_tiny_chat_model(root / "wider", seed=4, intermediate_size=96),
    }


def test_merge_t0_t1_and_midpoint(tmp_path, drafts):
    wa, wb = load_file(drafts["a"] / "model.safetensors"), load_file(drafts["b"] / "model.safetensors")
    for t, expect in ((0.0, wa), (1.0, wb)):
        out = merge.run(MergeConfig(a=str(drafts["a"]), b=str(drafts["b"]), t=t,
                                    out=str(tmp_path / f"m{t}"))).out
        got = load_file(out / "model.safetensors")
        for k in expect:
            assert torch.equal(got[k], expect[k]), k
    result = merge.run(MergeConfig(a=str(drafts["a"]), b=str(drafts["b"]), t=0.5,
                                   out=str(tmp_path / "mid")))
    got = load_file(result.out / "model.safetensors")
    key = "model.layers.0.mlp.up_proj.weight"
    torch.testing.assert_close(got[key], slerp(wa[key], wb[key], 0.5)[0])
    manifest = read_manifest(result.out)
    assert manifest["stage"] == "merge" and manifest["t"] == 0.5 and manifest["target"] == "T"
    # RMSNorm weights start at all ones in both drafts: parallel, merged linearly
    assert "model.norm.weight" in result.linear_fallback


@pytest.mark.parametrize("other,field", [("deeper", "num_hidden_layers"),
                                         ("wider", "intermediate_size")])
def test_mismatch_fails_before_writing(tmp_path, drafts, other, field):
    out = tmp_path / "never"
    with pytest.raises(MergeError, match=field):
        merge.run(MergeConfig(a=str(drafts["a"]), b=str(drafts[other]), out=str(out)))
    assert not out.exists() and not list(tmp_path.iterdir())


def test_vocabulary_mismatch_fails(tmp_path, drafts):
    from transformers import AutoTokenizer

    changed = tmp_path / "b2"
    import shutil

    shutil.copytree(drafts["b"], changed)
    tok = AutoTokenizer.from_pretrained(changed)
    vocab = tok.backend_tokenizer.to_str().replace('"~":', '"~~":')  # rename one token
    (changed / "tokenizer.json").write_text(vocab)
    with pytest.raises(MergeError, match="vocabular"):
        merge.run(MergeConfig(a=str(drafts["a"]), b=str(changed), out=str(tmp_path / "o")))
    assert not (tmp_path / "o").exists()


def test_cli_smoke(tmp_path, drafts):
    out = tmp_path / "merged"
    proc = subprocess.run([sys.executable, "-m", "specdec.merge", "--a", str(drafts["a"]),
                           "--b", str(drafts["b"]), "--t", "0.3", "--out", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert read_manifest(out)["t"] == 0.3 and "linear fallback" in proc.stdout

def test_main_reports_a_mismatch(tmp_path, drafts, capsys):
    code = merge.main(["--a", str(drafts["a"]), "--b", str(drafts["deeper"]), "--out",
                       str(tmp_path / "bad")])
    assert code == 2 and "num_hidden_layers" in capsys.readouterr().out
    assert not (tmp_path / "bad").exists()
