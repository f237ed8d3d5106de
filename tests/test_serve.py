"""The OpenAI-compatible server, driven over loopback by the official openai client and httpx.

A tiny random Llama with SmolLM2's real tokenizer (vocab 49152, hidden 64) serves most tests:
the engine and HTTP mechanics are what is tested, not the text. One test serves SmolLM2 itself
(marked slow). Every network wait is bounded.
"""

from __future__ import annotations

import copy
import json
import os
import socket
import subprocess
import sys
import time
import types

import httpx
import openai
import pytest
import torch
from conftest import make_tiny_llama
from prometheus_client.parser import text_string_to_metric_families

from specdec.data import chat_ids
from specdec.decode.engine import SpeculativeEngine
from specdec.decode.sampling import SamplingParams
from specdec.serve import ServeConfig, create_app, running_server
from specdec.serve.app import TextStream
from specdec.serve.cli import config_from_args
from specdec.serve.cli import main as serve_main

MODEL = "tiny"
K = 3
TIMEOUT = 60.0
HELLO = [{"role": "user", "content": "Hello there, how are you?"}]


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """Tiny models run ~20x faster with one intra-op thread on a shared 2-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny_pair(seed: int = 0, layers: int = 2, noise: float = 0.05):
    """(target, draft): a tiny random Llama with SmolLM2's vocabulary, and a noisy copy of it
    as the draft (so some drafts are accepted and some are not). The block weights are scaled
    up so that greedy text varies instead of repeating one token."""
    target = make_tiny_llama(seed=seed, vocab_size=49152, num_layers=layers)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in target.named_parameters():
            if p.dim() == 2 and "embed" not in name:
                p.mul_(5.0)
        draft = copy.deepcopy(target)
        for name, p in draft.named_parameters():
            if p.dim() == 2 and "embed" not in name:
                p.add_(torch.randn(p.shape, generator=gen) * p.std() * noise)
    return target, draft


@pytest.fixture(scope="module")
def tokenizer(smollm2_path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_path)


@pytest.fixture(scope="module")
def models():
    return tiny_pair()


@pytest.fixture(scope="module")
def offline(models, tokenizer):
    """An engine of its own over the same models: what the server must reproduce."""
    target, draft = models
    return SpeculativeEngine(target, draft, k=K, tokenizer=tokenizer)


@pytest.fixture(scope="module")
def served(models, tokenizer):
    """(base_url, app) of a server over the tiny pair."""
    target, draft = models
    engine = SpeculativeEngine(target, draft, k=K, tokenizer=tokenizer)
    cfg = ServeConfig(target=MODEL, k=K, max_batch=4, max_queue=16, default_max_tokens=16)
    app = create_app(cfg, engine=engine, tokenizer=tokenizer)
    with running_server(app) as base_url:
        yield base_url, app


@pytest.fixture(scope="module")
def client(served):
    return openai.OpenAI(base_url=served[0] + "/v1", api_key="unused", max_retries=0,
                         timeout=TIMEOUT)


def offline_text(offline, prompt_ids, **params):
    [result] = offline.generate([prompt_ids], SamplingParams(**params))
    return result


def metrics_of(base_url, headers=None) -> dict[str, float]:
    """{sample name with labels: value} from /metrics."""
    r = httpx.get(base_url + "/metrics", headers=headers, timeout=TIMEOUT)
    assert r.status_code == 200, r.text
    out = {}
    for family in text_string_to_metric_families(r.text):
        for s in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()))
            out[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
    return out


# ----------------------------------------------------------------------------- happy paths


def test_chat_greedy_equals_offline_engine(client, offline, tokenizer):
    expected = offline_text(offline, chat_ids(tokenizer, HELLO), temperature=0, max_tokens=20)
    resp = client.chat.completions.create(model=MODEL, messages=HELLO, temperature=0,
                                          max_tokens=20)
    assert resp.object == "chat.completion"
    assert resp.choices[0].message.role == "assistant"
    assert resp.choices[0].message.content == expected.text
    assert resp.choices[0].finish_reason == expected.finish_reason
    usage = resp.usage
    assert usage.prompt_tokens == len(chat_ids(tokenizer, HELLO))
    assert usage.completion_tokens == len(expected.token_ids)
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    spec = usage.model_extra["spec_decode"]
    assert spec["k"] == K
    assert spec["drafted"] == expected.drafted and spec["accepted"] == expected.accepted
    assert spec["acceptance_rate"] == pytest.approx(expected.acceptance_rate, abs=1e-6)
    assert spec["mean_accepted_length"] == pytest.approx(expected.mean_accepted_length, abs=1e-6)
    assert spec["accepted_per_position"] == expected.accepted_per_position


def test_chat_stream_equals_offline_engine(client, offline, tokenizer):
    expected = offline_text(offline, chat_ids(tokenizer, HELLO), temperature=0, max_tokens=24)
    stream = client.chat.completions.create(model=MODEL, messages=HELLO, temperature=0,
                                            max_tokens=24, stream=True,
                                            stream_options={"include_usage": True})
    deltas, finish, usage, roles = [], None, None, []
    for chunk in stream:
        assert chunk.object == "chat.completion.chunk"
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            if choice.delta.role:
                roles.append(choice.delta.role)
            if choice.delta.content:
                deltas.append(choice.delta.content)
            if choice.finish_reason:
                finish = choice.finish_reason
    assert roles == ["assistant"]
    assert "".join(deltas) == expected.text
    assert len(deltas) > 1  # streamed, not sent in one piece
    assert finish == expected.finish_reason
    assert usage.completion_tokens == len(expected.token_ids)
    assert usage.model_extra["spec_decode"]["accepted"] == expected.accepted


def test_completions_stream_and_not(client, offline, tokenizer):
    prompt = "The capital of France is"
    expected = offline_text(offline, tokenizer.encode(prompt), temperature=0, max_tokens=12)
    resp = client.completions.create(model=MODEL, prompt=prompt, temperature=0, max_tokens=12)
    assert resp.object == "text_completion"
    assert resp.choices[0].text == expected.text
    assert resp.choices[0].finish_reason == "length"
    assert resp.usage.completion_tokens == 12
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model=MODEL, prompt=prompt, temperature=0, max_tokens=12, stream=True) if c.choices)
    assert streamed == expected.text
    # a prompt given as token ids is served as they are
    ids_resp = client.completions.create(model=MODEL, prompt=tokenizer.encode(prompt),
                                         temperature=0, max_tokens=12)
    assert ids_resp.choices[0].text == expected.text


def test_stop_string_streamed_and_not(client, offline, tokenizer):
    ids = chat_ids(tokenizer, HELLO)
    full = offline_text(offline, ids, temperature=0, max_tokens=24).text
    stop = full[len(full) // 2: len(full) // 2 + 3]
    assert stop.strip(), f"pick another stop in {full!r}"
    expected = offline_text(offline, ids, temperature=0, max_tokens=24, stop=[stop])
    assert expected.finish_reason == "stop" and stop not in expected.text
    resp = client.chat.completions.create(model=MODEL, messages=HELLO, temperature=0,
                                          max_tokens=24, stop=stop)
    assert resp.choices[0].message.content == expected.text
    assert resp.choices[0].finish_reason == "stop"
    streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
        model=MODEL, messages=HELLO, temperature=0, max_tokens=24, stop=[stop], stream=True)
        if c.choices)
    assert streamed == expected.text


def test_text_stream_holds_back_possible_stop_prefixes(tokenizer):
    ids = tokenizer.encode(" hello world, stop here and more")
    stream = TextStream(tokenizer, [1], ["stop here"])
    sent = "".join(stream.push([t]) for t in ids)
    assert sent == " hello world, "  # never a character of the stop string
    assert stream.finish(" hello world, ") == ""


def test_seeded_sampling_is_reproducible(client):
    kwargs = dict(model=MODEL, messages=HELLO, temperature=0.9, top_p=0.95, max_tokens=16,
                  seed=1234)
    first = client.chat.completions.create(**kwargs).choices[0].message.content
    second = client.chat.completions.create(**kwargs).choices[0].message.content
    assert first == second and first


def test_models_health_and_metrics(served, client):
    base_url, app = served
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL]
    health = httpx.get(base_url + "/health", timeout=TIMEOUT)
    assert health.status_code == 200 and health.json()["status"] == "ok"

    before = metrics_of(base_url)
    resp = client.chat.completions.create(model=MODEL, messages=HELLO, temperature=0,
                                          max_tokens=16)
    after = metrics_of(base_url)
    spec = resp.usage.model_extra["spec_decode"]

    def delta(name):
        return after.get(name, 0.0) - before.get(name, 0.0)

    assert delta("specdec:spec_decode_num_drafts_total") == spec["steps"] > 0
    assert delta("specdec:spec_decode_num_draft_tokens_total") == spec["drafted"] == K * spec["steps"]
    assert delta("specdec:spec_decode_num_accepted_tokens_total") == spec["accepted"]
    per_pos = [delta(f"specdec:spec_decode_num_accepted_tokens_per_pos_total{{position={j}}}")
               for j in range(K)]
    assert per_pos == spec["accepted_per_position"] and sum(per_pos) == spec["accepted"]
    assert delta("specdec:generation_tokens_total") >= resp.usage.completion_tokens
    assert delta("specdec:prompt_tokens_total") == resp.usage.prompt_tokens
    assert delta("specdec:request_success_total{finished_reason=length}") == 1
    assert delta("specdec:time_to_first_token_seconds_count") == 1
    assert delta("specdec:e2e_request_latency_seconds_count") == 1
    assert delta("specdec:inter_token_latency_seconds_count") == spec["steps"] - 1
    assert after["specdec:num_requests_running"] == 0


# -------------------------------------------------------------------------------- errors


def _chat(**fields):
    return {"model": MODEL, "messages": HELLO, "max_tokens": 4, **fields}


BAD_REQUESTS = [
    ("chat", b'{"model": "tiny", "messages": [', None),
    ("chat", b"", None),
    ("chat", b"[1, 2]", None),
    ("chat", _chat(temperature=-0.5), "temperature"),
    ("chat", _chat(temperature="hot"), "temperature"),
    ("chat", _chat(max_tokens="5"), "max_tokens"),
    ("chat", _chat(max_tokens=0), "max_tokens"),
    ("chat", _chat(max_tokens=10**6), "max_tokens"),
    ("chat", _chat(messages=[{"role": "user", "content": "word " * 800}]), "messages"),
    ("chat", _chat(messages=[]), "messages"),
    ("chat", _chat(messages="hi"), "messages"),
    ("chat", _chat(messages=[{"role": "wizard", "content": "hi"}]), "messages[0].role"),
    ("chat", _chat(messages=[{"role": "user", "content": 5}]), "messages[0].content"),
    ("chat", _chat(n=2), "n"),
    ("chat", _chat(top_p=0), "top_p"),
    ("chat", _chat(seed=-1), "seed"),
    ("chat", _chat(stop=5), "stop"),
    ("chat", _chat(logprobs=True), "logprobs"),
    ("chat", _chat(stream="yes"), "stream"),
    ("chat", {"messages": HELLO}, "model"),
    ("completions", {"model": MODEL}, "prompt"),
    ("completions", {"model": MODEL, "prompt": ["a", "b"]}, "prompt"),
    ("completions", {"model": MODEL, "prompt": [1, 10**9]}, "prompt"),
    ("completions", {"model": MODEL, "prompt": "hi", "max_tokens": 1.5}, "max_tokens"),
]


@pytest.mark.parametrize("route,body,param", BAD_REQUESTS,
                         ids=[f"{r}-{p}-{i}" for i, (r, _, p) in enumerate(BAD_REQUESTS)])
def test_bad_request_is_400_naming_the_field(served, route, body, param):
    url = served[0] + ("/v1/chat/completions" if route == "chat" else "/v1/completions")
    if isinstance(body, bytes):
        r = httpx.post(url, content=body, headers={"content-type": "application/json"},
                       timeout=TIMEOUT)
    else:
        r = httpx.post(url, json=body, timeout=TIMEOUT)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param
    assert error["message"]
    if param is not None:
        assert error["message"].startswith(param)


def test_errors_through_the_openai_client(client, served):
    with pytest.raises(openai.BadRequestError) as bad:
        client.chat.completions.create(model=MODEL, messages=HELLO, temperature=-1)
    assert bad.value.status_code == 400 and "temperature" in str(bad.value)
    with pytest.raises(openai.NotFoundError) as missing:
        client.chat.completions.create(model="gpt-4", messages=HELLO)
    assert "gpt-4" in str(missing.value)
    for path in ("/nowhere", "/docs", "/openapi.json"):
        r = httpx.get(served[0] + path, timeout=TIMEOUT)
        assert r.status_code == 404 and r.json()["error"]["type"] == "not_found_error"
    r = httpx.get(served[0] + "/v1/chat/completions", timeout=TIMEOUT)
    assert r.status_code == 405 and set(r.json()["error"]) == {"message", "type", "param", "code"}


@pytest.mark.parametrize("stream", [True, False], ids=["stream", "non-stream"])
def test_client_gone_mid_request_frees_the_engine(served, stream, monkeypatch):
    base_url, app = served
    state = app.state.specdec
    engine, generate = state.worker.engine, state.worker.engine.generate

    def paced(prompts, params, stream=None, **kwargs):
        """Each step's tokens 20 ms late, so that a fast machine cannot finish the 400 tokens
        (at most k + 1 a step) before the client below gives up after 0.5 s."""
        def late(index, token_ids):
            time.sleep(0.02)
            return stream(index, token_ids)
        return generate(prompts, params, stream=late if stream else None, **kwargs)

    monkeypatch.setattr(engine, "generate", paced)
    start = metrics_of(base_url)
    before = start.get("specdec:request_aborted_total", 0.0)
    body = _chat(max_tokens=400, temperature=0, stream=stream, ignore_eos=True)
    url = base_url + "/v1/chat/completions"
    if stream:
        with httpx.Client(timeout=TIMEOUT) as http:
            with http.stream("POST", url, json=body) as r:
                assert r.status_code == 200
                got = [line for line, _ in zip(r.iter_lines(), range(4)) if line.startswith("data: ")]
                assert got
            # leaving the block closes the connection mid-stream
    else:
        with pytest.raises(httpx.ReadTimeout):  # a client that gives up and hangs up
            httpx.post(url, json=body, timeout=httpx.Timeout(TIMEOUT, read=0.5))
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        aborted = metrics_of(base_url).get("specdec:request_aborted_total", 0.0) - before
        if aborted == 1 and state.worker.num_running == 0:
            break
        time.sleep(0.05)
    assert aborted == 1, "the request of the client that went away was not aborted"
    assert state.worker.num_running == 0
    # the batch ended early: fewer than the 400 tokens asked for were generated
    generated = (metrics_of(base_url)["specdec:generation_tokens_total"]
                 - start["specdec:generation_tokens_total"])
    assert 0 < generated < 400
    # and the server still serves
    r = httpx.post(url, json=_chat(temperature=0), timeout=TIMEOUT)
    assert r.status_code == 200


def test_a_cancelled_row_leaves_the_batch_and_the_others_go_on(models, offline):
    """Two jobs in one batch; one is cancelled after its first tokens: its row ends at the next
    step (not at the end of the batch) and the other decodes exactly as it would alone."""
    import asyncio

    from specdec.serve.metrics import ServerMetrics
    from specdec.serve.worker import EngineWorker, Job

    target, draft = models
    worker = EngineWorker(SpeculativeEngine(target, draft, k=K), max_batch=4,
                          metrics=ServerMetrics())
    params = SamplingParams(temperature=0, max_tokens=120, ignore_eos=True)
    prompts = [[5, 9, 2, 7, 11], [3, 8, 8, 1]]

    async def scenario():
        loop = asyncio.get_running_loop()
        jobs = [Job(p, params, loop) for p in prompts]
        with worker._cond:  # both queued before the worker can take either: one batch
            for job in jobs:
                worker.submit(job)
        kind, _ = await jobs[0].events.get()
        assert kind == "tokens"
        jobs[0].cancel()
        ends = []
        for job in jobs:
            while (event := await job.events.get())[0] == "tokens":
                pass
            ends.append(event)
        return ends

    worker.start()
    try:
        (kind0, _), (kind1, result1) = asyncio.run(scenario())
    finally:
        worker.stop()
    assert worker.batches == 1
    assert kind0 == "cancelled" and kind1 == "done"
    alone = offline_text(offline, prompts[1], temperature=0, max_tokens=120, ignore_eos=True)
    assert result1.token_ids == alone.token_ids and len(alone.token_ids) == 120
    generated = worker.metrics.generation_tokens._value.get()
    assert generated < 120 + 20, f"the cancelled row went on decoding ({generated} tokens)"


# ------------------------------------------------------------------------------- API key


def test_api_key_checked_on_every_route_but_health(models, tokenizer):
    target, draft = models
    engine = SpeculativeEngine(target, draft, k=2, tokenizer=tokenizer)
    cfg = ServeConfig(target=MODEL, k=2, api_key="s3cret", default_max_tokens=4)
    with running_server(create_app(cfg, engine=engine, tokenizer=tokenizer)) as base_url:
        for method, path in [("GET", "/v1/models"), ("GET", "/metrics"),
                             ("POST", "/v1/chat/completions"), ("POST", "/v1/completions")]:
            for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
                r = httpx.request(method, base_url + path, headers=headers, json={},
                                  timeout=TIMEOUT)
                assert r.status_code == 401, (path, headers, r.text)
                assert r.json()["error"]["code"] == "invalid_api_key"
        assert httpx.get(base_url + "/health", timeout=TIMEOUT).status_code == 200
        good = {"Authorization": "Bearer s3cret"}
        assert httpx.get(base_url + "/metrics", headers=good, timeout=TIMEOUT).status_code == 200
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=base_url + "/v1", api_key="wrong", max_retries=0,
                          timeout=TIMEOUT).models.list()
        ok = openai.OpenAI(base_url=base_url + "/v1", api_key="s3cret", max_retries=0,
                           timeout=TIMEOUT)
        resp = ok.completions.create(model=MODEL, prompt="Hi", temperature=0)
        assert resp.usage.completion_tokens == 4  # default_max_tokens


# ------------------------------------------------------------------------------- the CLI


def test_config_from_args_reads_the_api_key_env():
    cfg = config_from_args(["--target", "t", "--k", "2"], environ={"SPECDEC_API_KEY": "abc"})
    assert (cfg.target, cfg.k, cfg.api_key, cfg.host, cfg.port) == ("t", 2, "abc", "127.0.0.1", 8000)
    assert config_from_args(["--api-key", "x"], environ={"SPECDEC_API_KEY": "abc"}).api_key == "x"
    assert config_from_args([], environ={}).api_key is None


def test_backend_vllm_dispatches_or_explains(monkeypatch, capsys):
    seen = {}
    fake = types.ModuleType("specdec.vllm")
    fake.serve = lambda cfg: seen.setdefault("cfg", cfg) and 0
    monkeypatch.setitem(sys.modules, "specdec.vllm", fake)
    assert serve_main(["--backend", "vllm", "--target", "t", "--draft", "d", "--k", "3"]) == 0
    assert (seen["cfg"].target, seen["cfg"].draft, seen["cfg"].k) == ("t", "d", 3)
    monkeypatch.setitem(sys.modules, "specdec.vllm", types.ModuleType("specdec.vllm"))
    assert serve_main(["--backend", "vllm"]) == 2
    assert "serve(cfg)" in capsys.readouterr().err


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_cli_serves_a_checkpoint(tmp_path, tokenizer):
    from specdec.models import save_checkpoint

    target, draft = tiny_pair(seed=3)
    save_checkpoint(target, tokenizer, tmp_path / "target", {"stage": "test"})
    save_checkpoint(draft, tokenizer, tmp_path / "draft", {"stage": "test"})
    port = _free_port()
    env = {**os.environ, "SPECDEC_API_KEY": "k3y", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "specdec.serve", "--target", str(tmp_path / "target"),
         "--draft", str(tmp_path / "draft"), "--k", "2", "--port", str(port),
         "--served-model-name", "cli-tiny", "--log-level", "warning"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    base_url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                if httpx.get(base_url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        assert proc.poll() is None, proc.stdout.read()
        client = openai.OpenAI(base_url=base_url + "/v1", api_key="k3y", max_retries=0,
                               timeout=TIMEOUT)
        resp = client.chat.completions.create(model="cli-tiny", messages=HELLO, temperature=0,
                                              max_tokens=8)
        assert resp.usage.completion_tokens == 8
        assert resp.usage.model_extra["spec_decode"]["k"] == 2
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


# ----------------------------------------------------------------------------- SmolLM2


@pytest.mark.slow
def test_smollm2_end_to_end(smollm2_path):
    """The real target with a draft cut from it (layers 20 and 21 removed, not healed)."""
    from specdec.models import load_model
    from specdec.prune import remove_layers

    target, tokenizer = load_model("smollm2-135m-instruct")
    draft = remove_layers(copy.deepcopy(target), [20, 21])
    engine = SpeculativeEngine(target, draft, k=3, tokenizer=tokenizer)
    offline_engine = SpeculativeEngine(target, draft, k=3, tokenizer=tokenizer)
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    [expected] = offline_engine.generate([chat_ids(tokenizer, messages)],
                                         SamplingParams(temperature=0, max_tokens=12))
    cfg = ServeConfig(target="smollm2-135m-instruct", k=3)
    with running_server(create_app(cfg, engine=engine, tokenizer=tokenizer)) as base_url:
        client = openai.OpenAI(base_url=base_url + "/v1", api_key="x", max_retries=0,
                               timeout=120)
        resp = client.chat.completions.create(model=cfg.target, messages=messages,
                                              temperature=0, max_tokens=12)
        assert resp.choices[0].message.content == expected.text
        assert "Paris" in expected.text
        spec = resp.usage.model_extra["spec_decode"]
        assert spec["accepted"] == expected.accepted and spec["accepted"] > 0
        streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
            model=cfg.target, messages=messages, temperature=0, max_tokens=12, stream=True)
            if c.choices)
        assert streamed == expected.text
        assert metrics_of(base_url)["specdec:spec_decode_num_accepted_tokens_total"] >= 2 * spec["accepted"]
