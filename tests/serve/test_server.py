"""The OpenAI-compatible server, driven by the official `openai` client on a loopback port."""

from __future__ import annotations

import json
import socket
import threading
import time

import pytest
import torch

openai = pytest.importorskip("openai")
uvicorn = pytest.importorskip("uvicorn")

import herd  # noqa: E402
from herd.serve.app import create_app  # noqa: E402

API_KEY = "test-key"


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """A random tiny model whose vocabulary covers the real Llama 4 tokenizer (used by default)."""
    from builders import random_hf_model, real_vocab_config

    cfg = real_vocab_config()
    path = tmp_path_factory.mktemp("served")
    random_hf_model(cfg, seed=0, std=0.5).save_pretrained(path)
    return path


class ScriptedModel(torch.nn.Module):
    """Wraps a real model but makes it emit a fixed token script (to exercise tool-call parsing end to end)."""

    def __init__(self, model, script):
        super().__init__()
        self.inner, self.script, self.config, self.step = model, script, model.config, 0

    def new_cache(self, batch=1):
        return self.inner.new_cache(batch)

    def forward(self, ids, cache=None, last_only=False, **kw):
        out = self.inner(ids, cache=cache, last_only=last_only, **kw)
        if ids.shape[1] > 1:
            self.step = 0
        token = self.script[min(self.step, len(self.script) - 1)]
        self.step += 1
        forced = torch.full_like(out, -1e4)
        forced[..., token] = 1e4
        return forced


class Server:
    def __init__(self, app):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="error"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self):
        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started:
            assert time.time() < deadline, "server did not start"
            time.sleep(0.05)
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(timeout=30)

    def client(self, key=API_KEY):
        return openai.OpenAI(base_url=f"http://127.0.0.1:{self.port}/v1", api_key=key, max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def llm(tiny_dir):
    return herd.load(tiny_dir)


@pytest.fixture(scope="module")
def server(llm):
    with Server(create_app(llm, model_name="tiny", api_key=API_KEY, parallel=4, ctx=256)) as srv:
        yield srv


MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."}]


def test_models_and_health(server):
    assert [m.id for m in server.client().models.list().data] == ["tiny"]
    import httpx

    assert httpx.get(f"http://127.0.0.1:{server.port}/health").json()["status"] == "ok"


def test_chat_non_streaming_matches_library(server, llm):
    resp = server.client().chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=12, temperature=0)
    want = llm.chat(MESSAGES, max_tokens=12, temperature=0)
    assert resp.choices[0].message.content == want["content"]
    assert resp.choices[0].finish_reason in ("stop", "length")
    assert resp.usage.prompt_tokens == len(llm.format_chat(MESSAGES))
    assert 1 <= resp.usage.completion_tokens <= 12


def test_chat_streaming_equals_non_streaming(server):
    client = server.client()
    full = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=16, temperature=0)
    chunks = list(
        client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=16, temperature=0, stream=True,
                                       stream_options={"include_usage": True})
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [full.choices[0].finish_reason]
    assert chunks[-1].usage.completion_tokens == full.usage.completion_tokens


def test_completions_endpoint(server, llm):
    resp = server.client().completions.create(model="tiny", prompt="Once upon a time", max_tokens=8, temperature=0)
    assert resp.choices[0].text == llm.complete("Once upon a time", max_tokens=8, temperature=0)


def test_tool_call_round_trip(llm):
    call = '{"name": "get_weather", "parameters": {"city": "Paris"}}'
    script = llm.tokenizer.encode(call) + [llm.tokenizer.eot_id]
    scripted = herd.LLM(ScriptedModel(llm.model, script), tokenizer=llm.tokenizer)
    tools = [{"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                               "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]
    with Server(create_app(scripted, model_name="tiny", api_key=API_KEY, parallel=2, ctx=512)) as srv:
        client = srv.client()
        messages = [{"role": "user", "content": "Weather in Paris?"}]
        resp = client.chat.completions.create(model="tiny", messages=messages, tools=tools, max_tokens=40, temperature=0)
        choice = resp.choices[0]
        assert choice.finish_reason == "tool_calls"
        tc = choice.message.tool_calls[0]
        assert tc.function.name == "get_weather" and json.loads(tc.function.arguments) == {"city": "Paris"}
        # streamed, the same call arrives as tool_call deltas
        chunks = list(client.chat.completions.create(model="tiny", messages=messages, tools=tools, max_tokens=40,
                                                     temperature=0, stream=True))
        deltas = [d for c in chunks if c.choices for d in (c.choices[0].delta.tool_calls or [])]
        assert deltas and deltas[0].function.name == "get_weather"
        # the client sends the call and its result back: the server formats the whole dialog
        messages += [
            {"role": "assistant", "content": None, "tool_calls": [tc.model_dump()]},
            {"role": "tool", "tool_call_id": tc.id, "content": json.dumps({"temp_c": 18})},
        ]
        follow = client.chat.completions.create(model="tiny", messages=messages, tools=tools, max_tokens=40, temperature=0)
        assert follow.choices[0].message.tool_calls[0].function.name == "get_weather"


@pytest.mark.parametrize(
    "body,fragment",
    [
        ({"messages": [{"role": "wizard", "content": "hi"}]}, "role"),
        ({"messages": [{"role": "user", "content": 5}]}, "content"),
        ({"messages": MESSAGES, "max_tokens": 0}, "max_tokens"),
        ({"messages": MESSAGES, "temperature": -1}, "temperature"),
        ({"messages": MESSAGES, "top_p": 1.5}, "top_p"),
        ({"messages": MESSAGES, "n": 2}, "n"),
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "user", "content": "word " * 400}], "max_tokens": 10}, "context"),
    ],
)
def test_bad_requests_get_400_with_openai_error_body(server, body, fragment):
    import httpx

    r = httpx.post(f"http://127.0.0.1:{server.port}/v1/chat/completions", json=body,
                   headers={"Authorization": f"Bearer {API_KEY}"}, timeout=60)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error" and fragment in err["message"]


def test_malformed_json_and_auth(server):
    import httpx

    url = f"http://127.0.0.1:{server.port}/v1/chat/completions"
    r = httpx.post(url, content=b"{not json", headers={"Authorization": f"Bearer {API_KEY}", "content-type": "application/json"})
    assert r.status_code == 400 and "JSON" in r.json()["error"]["message"]
    assert httpx.post(url, json={"messages": MESSAGES}).status_code == 401
    with pytest.raises(openai.AuthenticationError):
        server.client(key="wrong").models.list()


def test_openapi_schema_describes_the_endpoints(server):
    import httpx

    spec = httpx.get(f"http://127.0.0.1:{server.port}/openapi.json").json()
    assert {"/v1/chat/completions", "/v1/completions", "/v1/models", "/health"} <= set(spec["paths"])
    body = spec["components"]["schemas"]["ChatCompletionRequest"]["properties"]
    assert {"messages", "tools", "tool_choice", "stream", "max_tokens", "top_k", "min_p"} <= set(body)


def test_eight_concurrent_requests_get_their_solo_answers(llm):
    """Greedy answers of 8 concurrent requests of different lengths equal each request served alone."""
    from concurrent.futures import ThreadPoolExecutor

    prompts = [f"Question {i}: " + "tell me more " * i for i in range(8)]
    lengths = [3, 9, 5, 12, 7, 4, 10, 6]
    steps = []
    app = create_app(llm, model_name="tiny", api_key=API_KEY, parallel=8, ctx=512)
    app.state.engine.on_step = steps.append
    with Server(app) as srv:
        client = srv.client()

        def ask(i):
            msgs = [{"role": "user", "content": prompts[i]}]
            return client.chat.completions.create(model="tiny", messages=msgs, max_tokens=lengths[i], temperature=0)

        with ThreadPoolExecutor(8) as pool:
            together = list(pool.map(ask, range(8)))
    for i, resp in enumerate(together):
        alone = llm.chat([{"role": "user", "content": prompts[i]}], max_tokens=lengths[i], temperature=0)
        assert resp.choices[0].message.content == alone["content"], i
    assert max(steps) > 1  # requests really shared decode steps


def test_client_disconnect_frees_its_slot(llm):
    import httpx

    app = create_app(llm, model_name="tiny", api_key=API_KEY, parallel=1, ctx=4096)
    with Server(app) as srv:
        body = {"messages": MESSAGES, "max_tokens": 3000, "stream": True, "temperature": 0}
        with httpx.stream("POST", f"http://127.0.0.1:{srv.port}/v1/chat/completions", json=body,
                          headers={"Authorization": f"Bearer {API_KEY}"}, timeout=60) as r:
            for line in r.iter_lines():
                if line.startswith("data:") and '"content"' in line and '""' not in line:
                    break  # got a real token: now hang up
        deadline = time.time() + 10
        while app.state.engine.active_count and time.time() < deadline:
            time.sleep(0.05)
        assert app.state.engine.active_count == 0
        # and the freed slot serves the next request
        resp = srv.client().chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=3, temperature=0)
        assert resp.choices[0].finish_reason in ("stop", "length")
