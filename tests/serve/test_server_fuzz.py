"""Fuzzing the request bodies: no input may produce a 5xx or break the server for the next request."""

from __future__ import annotations

import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import herd  # noqa: E402
from herd.serve.app import create_app  # noqa: E402

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**40), 2**40) | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
message = st.fixed_dictionaries(
    {"role": st.sampled_from(["system", "user", "assistant", "tool", "developer", "bogus", 3])},
    optional={"content": json_values | st.text(max_size=30), "tool_calls": json_values, "name": json_values},
)
chat_body = st.fixed_dictionaries(
    {"messages": st.lists(message, max_size=3) | json_values},
    optional={
        "max_tokens": st.integers(-5, 6) | json_values,
        "temperature": st.floats(-1, 3, allow_nan=False) | json_values,
        "top_p": st.floats(-1, 2, allow_nan=False),
        "top_k": st.integers(-3, 50),
        "min_p": st.floats(-1, 2, allow_nan=False),
        "seed": st.integers(-(2**70), 2**70) | json_values,
        "stop": st.text(max_size=4) | st.lists(st.text(max_size=4), max_size=20) | json_values,
        "stream": st.booleans() | json_values,
        "n": st.integers(-1, 3),
        "presence_penalty": st.floats(-5, 5, allow_nan=False),
        "tools": json_values,
        "tool_choice": json_values,
    },
)
completion_body = st.fixed_dictionaries(
    {"prompt": st.text(max_size=30) | st.lists(st.integers(-10, 300000), max_size=5) | json_values},
    optional={"max_tokens": st.integers(-2, 4), "echo": json_values, "stream": st.booleans()},
)


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    from builders import random_hf_model, real_vocab_config
    from fastapi.testclient import TestClient

    cfg = real_vocab_config()
    path = tmp_path_factory.mktemp("fuzz")
    random_hf_model(cfg, seed=0).save_pretrained(path)
    app = create_app(herd.load(path), model_name="tiny", parallel=2, ctx=64)
    with TestClient(app) as c:
        yield c


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(body=chat_body)
def test_chat_bodies_never_5xx(client, body):
    r = client.post("/v1/chat/completions", json=body)
    assert r.status_code < 500, (body, r.text)
    if r.status_code == 400:
        assert r.json()["error"]["type"] == "invalid_request_error"


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(body=completion_body)
def test_completion_bodies_never_5xx(client, body):
    r = client.post("/v1/completions", json=body)
    assert r.status_code < 500, (body, r.text)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(raw=st.binary(max_size=60))
def test_raw_bytes_never_5xx(client, raw):
    r = client.post("/v1/chat/completions", content=raw, headers={"content-type": "application/json"})
    assert r.status_code < 500
    assert client.get("/health").status_code == 200
