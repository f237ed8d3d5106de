"""specdec.logit_cache: cached KD equals online KD, resumes bit-identically, refuses bad caches."""

import json
import subprocess
from collections import Counter
import sys

import pytest
import torch
from safetensors.torch import load_file

from specdec import finetune, logit_cache
from specdec.finetune import FinetuneConfig
from specdec.kd import OnlineTeacher, kd_losses
from specdec.logit_cache import CacheError, LogitCacheConfig
from specdec.models import load_model
from specdec.train_data import Selection, build_examples, collate, special_ids
from conftest import save_tiny_chat_model, write_chat_data


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    target = save_tiny_chat_model(root / "target", seed=2, num_layers=3,
                                  manifest={"stage": "test"})
    draft = save_tiny_chat_model(root / "draft", seed=1,
                                 manifest={"stage": "prune", "target": None})
    return target, draft


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_chat_data(tmp_path_factory.mktemp("data") / "d.jsonl", n=8)


def cache_cfg(target, data, out, **kw):
    base = dict(target=str(target), data=str(data), out=str(out), max_prompt_tokens=60,
                top_k=8, batch_size=3, shard_examples=3, device="cpu")
    base.update(kw)
    return LogitCacheConfig(**base)


@pytest.fixture(scope="module")
def cache(tmp_path_factory, models, data):
    out = tmp_path_factory.mktemp("cache") / "d.logits"
    result = logit_cache.run(cache_cfg(models[0], data, out, temperature=2.0))
    assert result.computed_shards == 3 and len(result.manifest["shards"]) == 3  # 8 examples
    return out


def cfg_for(models, data, out, **kw):
    base = dict(draft=str(models[1]), data=str(data), out=str(out), max_prompt_tokens=60,
                batch_size=4, micro_batch_size=2, max_steps=3, lr=1e-2, warmup_ratio=0.0,
                method="full", device="cpu", save_every=0, kd=0.5, kd_tv=1.0,
                kd_temperature=2.0, target=str(models[0]))
    base.update(kw)
    return FinetuneConfig(**base)


def weights(path):
    return load_file(str(path / "model.safetensors"))


def test_cached_targets_equal_the_online_teachers(models, data, cache):
    target, tok = load_model(models[0])
    stop_ids, pad_id = special_ids(target, tok)
    cfg = cfg_for(models, data, "unused", kd_cache=str(cache))
    examples = build_examples(Selection.of(cfg), tok, stop_ids, Counter())
    opened = finetune.open_kd_cache(cfg, {}, tok, stop_ids, pad_id, examples,
                                    logit_cache.data_sha256(str(data)))
    online = OnlineTeacher(target, 8, 2.0, torch.autocast("cpu", enabled=False))
    cached = logit_cache.CachedTeacher(opened, "cpu")
    draft = load_model(models[1])[0]
    for indices in ([0, 1], [7, 2, 5]):  # other batch compositions than the cache's
        batch = collate([examples[i] for i in indices], pad_id, "cpu")
        a, b = online(indices, *batch[:3]), cached(indices, *batch[:3])
        assert torch.equal(a.ids, b.ids)
        torch.testing.assert_close(a.logprobs, b.logprobs, rtol=0, atol=1e-5)
        torch.testing.assert_close(a.residual, b.residual, rtol=0, atol=1e-5)
        logits = finetune.response_logits(draft, *batch[:3])
        for x, y in zip(kd_losses(logits, a, 2.0), kd_losses(logits, b, 2.0)):
            assert x.item() > 0
            torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-5)


def test_cached_kd_finetune_matches_online_top_k_kd(tmp_path, models, data, cache):
    online = finetune.run(cfg_for(models, data, tmp_path / "online", kd_top_k=8))
    cached = finetune.run(cfg_for(models, data, tmp_path / "cached", kd_cache=str(cache)))
    assert cached.manifest["recipe"]["kd_top_k"] == 8  # taken from the cache
    assert cached.manifest["kd_teacher"].startswith("cache ")
    for key in ("loss", "ce", "kd", "tv"):
        a = torch.tensor([c[key] for c in online.curve])
        b = torch.tensor([c[key] for c in cached.curve])
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert online.curve[0]["kd"] > 0 and online.curve[0]["tv"] > 0
    a, b = weights(online.out), weights(cached.out)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)


class Stop(RuntimeError):
    pass


def stop_at_3(step, record):
    if step == 3:
        raise Stop()


def test_kd_cache_finetune_resumes_bit_identically(tmp_path, models, data, cache):
    kw = dict(kd_cache=str(cache), max_steps=5, save_every=2, batch_size=2, micro_batch_size=1,
              target=None)
    whole = finetune.run(cfg_for(models, data, tmp_path / "whole", **kw))
    cfg = cfg_for(models, data, tmp_path / "cut", **kw)
    with pytest.raises(Stop):
        finetune.run(cfg, on_step=stop_at_3)
    resumed = finetune.run(cfg)
    assert resumed.resumed_from == 2
    for key in ("loss", "ce", "kd", "tv"):
        assert [c[key] for c in resumed.curve] == [c[key] for c in whole.curve]
    a, b = weights(whole.out), weights(resumed.out)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)


def test_bad_caches_fail_clearly_and_keep_the_checkpoint(tmp_path, models, data):
    out = tmp_path / "c.logits"
    logit_cache.run(cache_cfg(models[0], data, out))
    cfg = cfg_for(models, data, tmp_path / "ft", kd_cache=str(out), max_steps=5, save_every=2,
                  kd_temperature=1.0)
    with pytest.raises(Stop):
        finetune.run(cfg, on_step=stop_at_3)
    state = finetune.ckpt_dir(cfg.out) / "state.pt"
    saved = state.read_bytes()

    def refused(match, **kw):
        with pytest.raises(CacheError, match=match) as err:
            finetune.run(cfg_for(models, kw.pop("data", data), tmp_path / "ft", **{
                "kd_cache": str(out), "max_steps": 5, "save_every": 2, "kd_temperature": 1.0,
                **kw}))
        assert "rebuild it with: python -m specdec.logit_cache" in str(err.value)
        assert state.read_bytes() == saved  # the checkpoint already written is untouched
        return str(err.value)

    # a damaged shard: named, and the rebuild command repairs just that shard
    shard = out / "shard-00001.safetensors"
    blob = bytearray(shard.read_bytes())
    blob[-5] ^= 0xFF
    shard.write_bytes(bytes(blob))
    msg = refused("corrupt")
    assert str(shard) in msg and f"--out {out}" in msg and "--top-k 8" in msg
    assert logit_cache.run(cache_cfg(models[0], data, out)).computed_shards == 1
    # made for other settings than this run's
    assert "max_seq_len=1024 in the cache, 48 here" in refused("another record selection",
                                                               max_seq_len=48)
    refused("another --kd-temperature", kd_temperature=2.0)
    refused("another --kd-top-k", kd_top_k=4)
    other = tmp_path / "other.jsonl"
    other.write_text(data.read_text().replace("Hi", "Ho"))
    refused("another data file", data=str(other))
    refused("another target", target=str(models[1]))
    # incomplete: the build did not get to write manifest.json
    (out / "manifest.json").rename(out / "manifest.bak")
    assert "incomplete" in refused("incomplete")
    (out / "manifest.bak").rename(out / "manifest.json")
    # the CLI says the same and exits 2
    code = finetune.main(["--draft", str(models[1]), "--data", str(data), "--out",
                          str(tmp_path / "x"), "--full", "--kd", "0.5", "--kd-cache",
                          str(tmp_path / "nowhere"), "--max-prompt-tokens", "60",
                          "--device", "cpu"])
    assert code == 2 and state.read_bytes() == saved
    # and with the cache whole again, the run resumes where it was
    resumed = finetune.run(cfg)
    assert resumed.resumed_from == 2 and len(resumed.curve) == 5


def test_a_cache_dir_with_other_settings_is_not_overwritten(tmp_path, models, data):
    out = tmp_path / "c.logits"
    logit_cache.run(cache_cfg(models[0], data, out))
    before = sorted(p.name for p in out.iterdir())
    with pytest.raises(CacheError, match="other settings"):
        logit_cache.run(cache_cfg(models[0], data, out, top_k=4))
    assert sorted(p.name for p in out.iterdir()) == before
    assert logit_cache.run(cache_cfg(models[0], data, out)).computed_shards == 0


def test_cli_smoke(tmp_path, models, data):
    out = tmp_path / "cli.logits"
    cmd = [sys.executable, "-m", "specdec.logit_cache", "--target", str(models[0]), "--data",
           str(data), "--out", str(out), "--top-k", "4", "--dtype", "float16",
           "--max-prompt-tokens", "60", "--device", "cpu"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["top_k"] == 4 and manifest["examples"] == 8 and manifest["dtype"] == "float16"
    assert manifest["target_weights"] and manifest["data_sha256"]
    tensors = load_file(str(out / "shard-00000.safetensors"))
    assert tensors["ids"].dtype == torch.int32 and tensors["logprobs"].dtype == torch.float16
    assert "response tokens/s" in proc.stdout
