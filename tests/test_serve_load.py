"""Load: 32 concurrent streaming clients against a small queue. Every request either streams to
`data: [DONE]` with the offline engine's greedy text or is refused with an OpenAI-style 429;
none is lost or hangs, and the server is healthy after.

To make the 429s deterministic (no timing in the assertions) the engine is wrapped so that its
first batch waits at a gate until the clients that cannot fit have been refused.
"""

from __future__ import annotations

import asyncio
import json
import threading

import httpx
import pytest
import torch
from test_serve import metrics_of, tiny_pair

from specdec.data import chat_ids
from specdec.decode.engine import SpeculativeEngine
from specdec.decode.sampling import SamplingParams
from specdec.serve import ServeConfig, create_app, running_server

CLIENTS = 32
MAX_BATCH = 4
MAX_QUEUE = 4
MAX_TOKENS = 8
DEADLINE_S = 120.0


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tokenizer(smollm2_path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_path)


@pytest.fixture(scope="module")
def models():
    return tiny_pair(seed=5)


class GatedEngine:
    """The engine, but its first `generate` waits until `gate` opens."""

    def __init__(self, engine):
        self.engine = engine
        self.gate = threading.Event()
        self.batch_sizes: list[int] = []

    def __getattr__(self, name):
        return getattr(self.engine, name)

    def generate(self, prompts, params, stream=None):
        self.batch_sizes.append(len(prompts))
        if not self.gate.wait(timeout=DEADLINE_S):
            raise RuntimeError("the test never opened the gate")
        return self.engine.generate(prompts, params, stream=stream)


def messages(i: int) -> list[dict[str, str]]:
    return [{"role": "user", "content": f"Client {i} says: count to {i % 7 + 2}."}]


async def stream_one(http: httpx.AsyncClient, url: str, i: int, refused: list[int]):
    """('ok', text, finish_reason) or ('429', error) for client i."""
    body = {"model": "tiny", "messages": messages(i), "temperature": 0,
            "max_tokens": MAX_TOKENS, "stream": True}
    async with http.stream("POST", url, json=body) as r:
        if r.status_code == 429:
            error = json.loads(await r.aread())["error"]
            refused.append(i)
            return "429", error
        assert r.status_code == 200, await r.aread()
        text, finish, done = [], None, False
        async for line in r.aiter_lines():
            if not line:
                continue
            assert line.startswith("data: "), line
            data = line[len("data: "):]
            if data == "[DONE]":
                done = True
                break
            obj = json.loads(data)
            assert "error" not in obj, obj
            for choice in obj["choices"]:
                text.append(choice["delta"].get("content") or "")
                finish = choice["finish_reason"] or finish
        assert done, f"client {i}: the stream ended without [DONE]"
        return "ok", "".join(text), finish


async def run_clients(url: str, gate: threading.Event | None, expect_refused: int):
    refused: list[int] = []
    limits = httpx.Limits(max_connections=CLIENTS + 4)
    async with httpx.AsyncClient(timeout=DEADLINE_S, limits=limits) as http:
        tasks = [asyncio.create_task(stream_one(http, url, i, refused)) for i in range(CLIENTS)]
        if gate is not None:
            loop = asyncio.get_running_loop()
            deadline = loop.time() + DEADLINE_S
            while len(refused) < expect_refused and loop.time() < deadline:
                await asyncio.sleep(0.02)
            gate.set()
        return await asyncio.wait_for(asyncio.gather(*tasks), DEADLINE_S)


def expected_texts(models, tokenizer) -> list[str]:
    target, draft = models
    engine = SpeculativeEngine(target, draft, k=3, tokenizer=tokenizer)
    prompts = [chat_ids(tokenizer, messages(i)) for i in range(CLIENTS)]
    results = engine.generate(prompts, SamplingParams(temperature=0, max_tokens=MAX_TOKENS))
    return [r.text for r in results]


def test_32_streaming_clients_small_queue_complete_or_429(models, tokenizer):
    target, draft = models
    engine = GatedEngine(SpeculativeEngine(target, draft, k=3, tokenizer=tokenizer))
    cfg = ServeConfig(target="tiny", k=3, max_batch=MAX_BATCH, max_queue=MAX_QUEUE)
    app = create_app(cfg, engine=engine, tokenizer=tokenizer)
    cannot_fit = CLIENTS - MAX_BATCH - MAX_QUEUE
    expected = expected_texts(models, tokenizer)
    with running_server(app) as base_url:
        outcomes = asyncio.run(run_clients(base_url + "/v1/chat/completions", engine.gate,
                                           cannot_fit))
        served = {i: o for i, o in enumerate(outcomes) if o[0] == "ok"}
        refused = {i: o for i, o in enumerate(outcomes) if o[0] == "429"}
        assert len(served) + len(refused) == CLIENTS  # none lost
        assert len(refused) >= cannot_fit
        assert len(served) >= MAX_QUEUE + 1
        for i, (_, error) in refused.items():
            assert error["code"] == "rate_limit_exceeded" and "retry" in error["message"]
        for i, (_, text, finish) in served.items():
            assert text == expected[i], f"client {i}"
            assert finish == "length"
        assert max(engine.batch_sizes) == MAX_BATCH  # the queued requests ran as one batch

        health = httpx.get(base_url + "/health", timeout=30)
        assert health.status_code == 200
        assert health.json() == {"status": "ok", "running": 0, "waiting": 0}
        m = metrics_of(base_url)
        assert m["specdec:request_rejected_total{reason=queue_full}"] == len(refused)
        assert m["specdec:request_success_total{finished_reason=length}"] == len(served)
        assert m["specdec:generation_tokens_total"] == len(served) * MAX_TOKENS
        # and it still serves
        r = httpx.post(base_url + "/v1/chat/completions", timeout=60, json={
            "model": "tiny", "messages": messages(0), "temperature": 0, "max_tokens": MAX_TOKENS})
        assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == expected[0]


def test_32_streaming_clients_with_room_all_complete(models, tokenizer):
    target, draft = models
    engine = SpeculativeEngine(target, draft, k=3, tokenizer=tokenizer)
    cfg = ServeConfig(target="tiny", k=3, max_batch=8, max_queue=CLIENTS)
    app = create_app(cfg, engine=engine, tokenizer=tokenizer)
    expected = expected_texts(models, tokenizer)
    with running_server(app) as base_url:
        outcomes = asyncio.run(run_clients(base_url + "/v1/chat/completions", None, 0))
        assert [o[0] for o in outcomes] == ["ok"] * CLIENTS
        assert [o[1] for o in outcomes] == expected
        assert app.state.specdec.worker.batches >= CLIENTS // 8
        assert httpx.get(base_url + "/health", timeout=30).status_code == 200
