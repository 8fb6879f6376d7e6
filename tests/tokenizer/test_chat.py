"""Chat format against Meta's ChatFormat and the HF template; tool-call parsing; Jinja templates."""

from __future__ import annotations

import json
import sys
import types

import pytest

from herd import RequestError
from herd.tokenizer import ChatFormat, parse_tool_calls, render_jinja_template


@pytest.fixture(scope="module")
def meta_chat(meta_tokenizer):
    # chat_format imports torchvision-backed image transforms at module level; text dialogs never use them.
    # Stub torchvision only while importing it, then remove the stubs so other libraries don't see them.
    added = []
    try:
        import torchvision  # noqa: F401
    except Exception:
        for name in ("torchvision", "torchvision.transforms", "torchvision.transforms.functional"):
            stub = types.ModuleType(name)
            stub.__path__ = []
            sys.modules[name] = stub
            added.append(name)
        sys.modules["torchvision"].transforms = sys.modules["torchvision.transforms"]
        tr = sys.modules["torchvision.transforms"]
        tr.functional = sys.modules["torchvision.transforms.functional"]
        for attr in ("Compose", "ToTensor", "Normalize", "Resize", "InterpolationMode"):
            setattr(tr, attr, object)
    try:
        from llama_models.llama4.chat_format import ChatFormat as MetaChatFormat
    finally:
        for name in added:
            sys.modules.pop(name, None)
    from llama_models.datatypes import RawMessage, StopReason, ToolCall

    return MetaChatFormat(meta_tokenizer), RawMessage, StopReason, ToolCall


DIALOGS = [
    [{"role": "user", "content": "What is 2+2?"}],
    [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "Hi!"},
        {"role": "assistant", "content": "Hello! How can I help?"},
        {"role": "user", "content": "Tell me a joke."},
    ],
    [
        {"role": "system", "content": "  Answer in French.\n"},
        {"role": "user", "content": "Where is <|eot|> the station?\n"},
        {"role": "assistant", "content": "Là-bas. 🚉"},
        {"role": "user", "content": [{"type": "text", "text": "Merci, "}, {"type": "text", "text": "et après ?"}]},
    ],
]


def _meta_ids(meta, messages):
    fmt, RawMessage, StopReason, ToolCall = meta
    raw = []
    for m in messages:
        content = m["content"]
        if isinstance(content, list):
            content = "".join(p["text"] for p in content)
        calls = [
            ToolCall(call_id=c["id"], tool_name=c["function"]["name"], arguments=json.loads(c["function"]["arguments"]))
            for c in m.get("tool_calls", [])
        ]
        raw.append(RawMessage(role=m["role"], content=content or "", tool_calls=calls,
                              stop_reason=StopReason.end_of_turn if not calls else StopReason.end_of_message))
    return fmt.encode_dialog_prompt(raw).tokens


@pytest.mark.parametrize("dialog", range(len(DIALOGS)))
def test_dialog_ids_equal_meta(meta_chat, herd_tiktoken, dialog):
    messages = DIALOGS[dialog]
    assert ChatFormat(herd_tiktoken).encode_dialog(messages) == _meta_ids(meta_chat, messages)


TOOL_DIALOG = [
    {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_0", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
    {"role": "tool", "tool_call_id": "call_0", "content": '{"temp_c": 18}'},
]


def test_tool_call_dialog_meta_style(meta_chat, herd_tiktoken):
    ids = ChatFormat(herd_tiktoken).encode_dialog(TOOL_DIALOG)
    assert ids == _meta_ids(meta_chat, TOOL_DIALOG)
    text = herd_tiktoken.decode(ids)
    assert text.endswith(
        '{"type": "function", "name": "get_weather", "parameters": {"city": "Paris"}}<|eom|>'
        '<|header_start|>ipython<|header_end|>\n\n{"temp_c": 18}<|eom|><|header_start|>assistant<|header_end|>\n\n'
    )


def test_tool_call_dialog_hf_style_matches_the_template_output(herd_tiktoken):
    # the HF chat template's rendering of this dialog (Llama 4 fact sheet, example iii)
    want = (
        "<|begin_of_text|><|header_start|>user<|header_end|>\n\nWeather in Paris?<|eot|>"
        "<|header_start|>assistant<|header_end|>\n\n<|python_start|><|python_end|>"
        '{"name": "get_weather", "parameters": {"city": "Paris"}}<|eot|>'
        '<|header_start|>ipython<|header_end|>\n\n"{\\"temp_c\\": 18}"<|eot|><|header_start|>assistant<|header_end|>\n\n'
    )
    ids = ChatFormat(herd_tiktoken, style="hf").encode_dialog(TOOL_DIALOG)
    assert herd_tiktoken.decode(ids) == want


MINIMAL_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|header_start|>{{ m['role'] }}<|header_end|>\n\n"
    "{{ m['content'] }}<|eot|>{% endfor %}{% if add_generation_prompt %}<|header_start|>assistant<|header_end|>\n\n{% endif %}"
)


@pytest.mark.parametrize("dialog", range(2))
def test_jinja_template_gives_the_same_ids(herd_tiktoken, dialog):
    messages = DIALOGS[dialog]
    rendered = render_jinja_template(MINIMAL_TEMPLATE, messages)
    assert herd_tiktoken.encode_with_specials(rendered) == ChatFormat(herd_tiktoken).encode_dialog(messages)


def test_jinja_template_is_sandboxed():
    with pytest.raises(RequestError):
        render_jinja_template("{{ messages.__class__.__mro__[1].__subclasses__() }}", [])
    with pytest.raises(RequestError, match="nope"):
        render_jinja_template("{{ raise_exception('nope') }}", [])


def test_bad_messages(herd_tiktoken):
    fmt = ChatFormat(herd_tiktoken)
    with pytest.raises(RequestError, match=r"messages\[0\]: unknown role 'wizard'"):
        fmt.encode_dialog([{"role": "wizard", "content": "x"}])
    with pytest.raises(RequestError, match="content must be"):
        fmt.encode_dialog([{"role": "user", "content": 5}])
    with pytest.raises(RequestError, match="images are not supported"):
        fmt.encode_dialog([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}])


@pytest.mark.parametrize(
    "text,name,args,content",
    [
        ('{"type": "function", "name": "get_weather", "parameters": {"city": "Paris"}}', "get_weather", {"city": "Paris"}, None),
        ('<|python_start|><|python_end|>{"name": "f", "parameters": {"a": 1}}', "f", {"a": 1}, None),
        ('{"name": "f", "parameters": {"a": [1, 2]}}', "f", {"a": [1, 2]}, None),
        ('[{"name": "f", "parameters": {}}, {"name": "g", "parameters": {"x": "y"}}]', "f", {}, None),
        ('[get_weather(city="Paris", days=3)]', "get_weather", {"city": "Paris", "days": 3}, None),
    ],
)
def test_parse_tool_calls(text, name, args, content):
    got_content, calls = parse_tool_calls(text)
    assert got_content == content
    assert calls[0]["type"] == "function" and calls[0]["id"] == "call_0"
    assert calls[0]["function"]["name"] == name and json.loads(calls[0]["function"]["arguments"]) == args


def test_plain_text_is_not_a_tool_call():
    for text in ["Hello there.", '{"no": "name"}', "[1, 2, 3]", "f(x)"]:
        assert parse_tool_calls(text) == (text, [])
