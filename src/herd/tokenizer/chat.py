"""The Llama 4 chat format, tool-call parsing, and Jinja chat templates.

Layout (both references): ``<|begin_of_text|>`` once, then per message
``<|header_start|>{role}<|header_end|>\\n\\n{content}`` closed by ``<|eot|>`` or ``<|eom|>``, then the
generation prompt ``<|header_start|>assistant<|header_end|>\\n\\n``. Role ``tool`` is written ``ipython``.
Special tokens are inserted by id; message text is always encoded as plain text, so special-token text
typed by a user (``<|eot|>``) stays text.

Tool calls: herd follows **Meta's reference** (``llama_models`` ChatFormat) by default, ``style="meta"``:

* an assistant tool call is appended after the content as ``{"type": "function", "name": N,
  "parameters": {...}}`` (``json.dumps`` defaults, one JSON object per call, no separator) and the
  message ends with ``<|eom|>``; a tool result is written as given and ends with ``<|eom|>``;
* header, content, each content part and each call are tokenized separately, as Meta does.

``style="hf"`` reproduces the Hugging Face chat template (``processing_llama4.py``) instead:

* the call is written ``<|python_start|>{content}<|python_end|>{"name": N, "parameters": {...}}`` (no
  "type" key, non-ASCII kept) and the message ends with ``<|eot|>``; tool results end with ``<|eot|>``;
* tool-result content goes through ``tojson``, so a string result becomes a quoted JSON string;
* a leading system message is stripped of surrounding whitespace;
* the text between two special tokens is tokenized as one string, as HF tokenizes the rendered
  template (content starting with "\\n" then merges with the header's "\\n\\n").

Deliberate differences from the HF template, in both styles: OpenAI's JSON-string ``arguments`` are
parsed and written as an object (HF writes whatever it is given, so a string would be quoted); an
assistant message with an empty ``tool_calls`` list is an ordinary message (HF drops it); ``tools=``
instruction blocks are not added here (the server adds its own system block).

Builtin tools (``brave_search.call(query=...)`` and the like) are not encoded specially: an OpenAI
message only names a function, so every call is written as a custom JSON call.

``parse_tool_calls`` reads generated calls back in every form above, plus a JSON list of calls, Meta's
pythonic ``[f(a="x")]`` and ``<function=f>{...}</function>`` forms and builtin ``name.call(query=...)``.
"""

from __future__ import annotations

import ast
import json
import re
from datetime import datetime
from typing import Any, Union

from ..errors import RequestError, TokenizerError
from .tokenizer import Tokenizer

ROLES = ("system", "user", "assistant", "tool", "ipython")
STYLES = ("meta", "hf")

Segment = Union[int, str]  # a special token id, or text to encode as plain text


def _parts_of(content: Any, where: str) -> list[str]:
    """Message content -> its text parts (a string is one part)."""
    if content is None:
        return []
    if isinstance(content, str):
        return [content]
    if isinstance(content, list):
        parts = []
        for i, part in enumerate(content):
            if isinstance(part, str):
                parts.append(part)
            elif isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str):
                parts.append(part["text"])
            elif isinstance(part, dict) and part.get("type") in ("image_url", "image", "input_image"):
                raise RequestError(f"{where}.content[{i}]: images are not supported yet")
            else:
                raise RequestError(f"{where}.content[{i}]: expected {{'type': 'text', 'text': <string>}}")
        return parts
    raise RequestError(f"{where}.content: must be a string, a list of content parts or null, got {type(content).__name__}")


def _call_of(call: Any, where: str) -> tuple[str, Any]:
    """OpenAI tool call -> (name, arguments object)."""
    fn = call.get("function") if isinstance(call, dict) else None
    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
        raise RequestError(f"{where}.tool_calls: each call needs {{'function': {{'name': <string>, 'arguments': ...}}}}")
    args = fn.get("arguments", {})
    if args is None:
        args = {}
    if isinstance(args, str):
        try:
            args = json.loads(args) if args.strip() else {}
        except ValueError:
            raise RequestError(f"{where}.tool_calls: function.arguments of {fn['name']!r} is not valid JSON") from None
    return fn["name"], args


class ChatFormat:
    """Encodes OpenAI-style message lists into Llama 4 prompt token ids (BOS included once)."""

    def __init__(self, tokenizer: Tokenizer, style: str = "meta"):
        if style not in STYLES:
            raise ValueError(f"style must be 'meta' or 'hf', got {style!r}")
        self.tok, self.style = tokenizer, style
        self._header_start = tokenizer.token_id("<|header_start|>")
        self._header_end = tokenizer.token_id("<|header_end|>")
        self._eot = tokenizer.token_id("<|eot|>")
        self._eom = tokenizer.token_id("<|eom|>")
        if tokenizer.bos_id is None:
            raise TokenizerError(f"{tokenizer.source}: the tokenizer has no BOS token, needed by the chat format")

    # ---------------------------------------------------------------- Meta's layout
    def header(self, role: str) -> list[int]:
        role = "ipython" if role == "tool" else role
        return [self._header_start, *self.tok.encode(role), self._header_end, *self.tok.encode("\n\n")]

    def _check(self, message: Any, index: int) -> tuple[str, str, list]:
        where = f"messages[{index}]"
        if not isinstance(message, dict):
            raise RequestError(f"{where}: expected an object with 'role' and 'content'")
        role = message.get("role")
        if role == "developer":
            role = "system"
        if role not in ROLES:
            raise RequestError(f"{where}.role: unknown role {role!r} (expected system, user, assistant or tool)")
        calls = message.get("tool_calls") or []
        if not isinstance(calls, list):
            raise RequestError(f"{where}.tool_calls: expected a list")
        if calls and role != "assistant":
            raise RequestError(f"{where}.tool_calls: only assistant messages carry tool_calls")
        return where, role, calls

    def encode_message(self, message: dict, index: int = 0) -> list[int]:
        """One message, header to terminator (no BOS)."""
        if self.style == "hf":
            return self._encode_segments(self._hf_segments(message, index))
        where, role, calls = self._check(message, index)
        content = message.get("content")
        ids = self.header(role)
        if role in ("tool", "ipython") and isinstance(content, dict):
            ids += self.tok.encode(json.dumps(content))
        else:
            for part in _parts_of(content, where):
                ids += self.tok.encode(part)
        for call in calls:
            name, args = _call_of(call, where)
            ids += self.tok.encode(json.dumps({"type": "function", "name": name, "parameters": args}))
        ids.append(self._eom if calls or role in ("tool", "ipython") else self._eot)
        return ids

    # ---------------------------------------------------------------- the HF template's layout
    def _hf_segments(self, message: dict, index: int) -> list[Segment]:
        where, role, calls = self._check(message, index)
        content = message.get("content")
        hs, he = self._header_start, self._header_end
        if role in ("tool", "ipython"):
            if isinstance(content, list):
                _parts_of(content, where)  # same validation as elsewhere
            text = "" if content is None else json.dumps(content, ensure_ascii=False)
            return [hs, "ipython", he, "\n\n" + text, self._eot]
        if isinstance(content, dict):
            raise RequestError(f"{where}.content: must be a string, a list of content parts or null, got dict")
        text = "".join(_parts_of(content, where))
        if calls:
            calls_text = ""
            for call in calls:
                name, args = _call_of(call, where)
                calls_text += '{"name": "' + name + '", "parameters": ' + json.dumps(args, ensure_ascii=False) + "}"
            python_start = self.tok.token_id("<|python_start|>")
            python_end = self.tok.token_id("<|python_end|>")
            return [hs, "assistant", he, "\n\n", python_start, text, python_end, calls_text, self._eot]
        if role == "system" and index == 0:
            text = text.strip()
        return [hs, role, he, "\n\n" + text, self._eot]

    def _encode_segments(self, segments: list[Segment]) -> list[int]:
        ids: list[int] = []
        text = ""
        for seg in segments:
            if isinstance(seg, str):
                text += seg
                continue
            if text:
                ids += self.tok.encode(text)
                text = ""
            ids.append(seg)
        if text:
            ids += self.tok.encode(text)
        return ids

    # ---------------------------------------------------------------- dialogs
    def encode_dialog(self, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
        """BOS, every message, then (by default) the assistant header the model completes."""
        if not isinstance(messages, list):
            raise RequestError("messages: expected a list of message objects")
        ids = [self.tok.bos_id]
        for i, message in enumerate(messages):
            ids += self.encode_message(message, i)
        if add_generation_prompt:
            ids += self.header("assistant")  # same ids in both styles ("\n\n" ends the header's text run)
        return ids


# ------------------------------------------------------------------------------------ tool-call parsing

_TAG_RE = re.compile(r"<\|python_start\|>|<\|python_end\|>|<\|eom\|>|<\|eot\|>")
_FUNCTION_TAG_RE = re.compile(r"<function=(?P<name>[^>}]+)>(?P<args>\{.*?\})(?:</function>)?", re.S)


def _as_call(obj: Any) -> tuple[str, dict] | None:
    """A decoded JSON value -> (name, arguments) if it is one call: {"name", "parameters"|"arguments"}."""
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str) or not obj["name"]:
        return None
    if obj.get("type", "function") != "function":
        return None
    key = "parameters" if "parameters" in obj else "arguments" if "arguments" in obj else None
    if key is None:
        return None
    args = obj[key]
    if isinstance(args, str):
        try:
            args = json.loads(args) if args.strip() else {}
        except ValueError:
            return None
    if args is None:
        args = {}
    return (obj["name"], args) if isinstance(args, dict) else None


def _json_calls(value: Any) -> list[tuple[str, dict]] | None:
    items = value if isinstance(value, list) else [value]
    calls = [_as_call(item) for item in items]
    return calls if calls and all(calls) else None  # type: ignore[return-value]


def _pythonic_calls(text: str) -> list[tuple[str, dict]] | None:
    """``[f(a="x", b=1), g()]`` or a builtin ``brave_search.call(query="x")`` -> calls, else None."""
    if not text or (text[0] != "[" and ".call(" not in text):
        return None
    try:
        tree = ast.parse(text, mode="eval")
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return None
    body = tree.body
    if isinstance(body, ast.Call):  # builtin tool: only the `name.call(...)` form
        if not (isinstance(body.func, ast.Attribute) and body.func.attr == "call" and isinstance(body.func.value, ast.Name)):
            return None
        nodes, builtin = [body], True
    elif isinstance(body, ast.List) and body.elts:
        nodes, builtin = body.elts, False
    else:
        return None
    calls = []
    for node in nodes:
        if not isinstance(node, ast.Call) or node.args:
            return None
        if builtin:
            name = node.func.value.id  # type: ignore[union-attr]
        elif isinstance(node.func, ast.Name):
            name = node.func.id
        else:
            return None
        try:
            args = {kw.arg: ast.literal_eval(kw.value) for kw in node.keywords}
        except (ValueError, TypeError, SyntaxError, RecursionError):
            return None
        if None in args:  # **kwargs
            return None
        calls.append((name, args))
    return calls


_JSON = json.JSONDecoder()
_MAX_TRAILING_CALLS_CHARS = 32_000
_MAX_TRAILING_CALLS_TRIES = 256


def _json_calls_from(body: str, start: int) -> list[tuple[str, dict]] | None:
    """The calls if ``body[start:]`` is one or more JSON calls (objects or lists of them), one after another
    (Meta and HF write several calls back to back)."""
    calls: list[tuple[str, dict]] = []
    pos, end = start, len(body)
    while pos < end:
        try:
            value, pos = _JSON.raw_decode(body, pos)
        except (ValueError, RecursionError):
            return None
        found = _json_calls(value)
        if not found:
            return None
        calls += found
        while pos < end and (body[pos].isspace() or body[pos] in ",;"):
            pos += 1
    return calls or None


def _calls_in(body: str) -> list[tuple[str, dict]] | None:
    """The calls if `body` (stripped) is nothing but tool calls."""
    if not body:
        return None
    if body[0] in "{[":
        found = _json_calls_from(body, 0)
        if found:
            return found
    m = _FUNCTION_TAG_RE.fullmatch(body)
    if m:
        try:
            args = json.loads(m.group("args"))
        except ValueError:
            return None
        return [(m.group("name").strip(), args)] if isinstance(args, dict) else None
    return _pythonic_calls(body)


def _trailing_json_calls(body: str) -> tuple[str, list[tuple[str, dict]]] | None:
    """Text ending in JSON call(s), e.g. "Let me check.\\n{"name": ...}" -> (text before, calls)."""
    first = max(0, len(body) - _MAX_TRAILING_CALLS_CHARS)  # calls are short: bound the work on long texts
    for n, m in enumerate(re.compile(r"[{\[]").finditer(body, first)):
        if n >= _MAX_TRAILING_CALLS_TRIES:
            break
        found = _json_calls_from(body, m.start())
        if found:
            return body[: m.start()], found
    return None


def parse_tool_calls(text: str) -> tuple[str | None, list[dict]]:
    """Generated assistant text -> (content or None, OpenAI-style tool_calls).

    Calls get ids ``call_0``, ``call_1``… and JSON-string ``arguments``. Text that holds no call comes
    back unchanged with an empty list. A call must end the text; text before it is the content.
    """
    if not isinstance(text, str):
        return text, []
    body = text.strip()
    content = ""
    m = re.fullmatch(r"<\|python_start\|>(.*?)<\|python_end\|>(.*)", body, re.S)
    if m and _TAG_RE.sub("", m.group(2)).strip():  # HF form: content inside the tags, calls after them
        content, body = m.group(1), m.group(2)
    body = _TAG_RE.sub("", body).strip()
    found = _calls_in(body)
    if found is None:
        tag = _FUNCTION_TAG_RE.search(body)
        if tag and not body[tag.end():].strip():
            found = _calls_in(body[tag.start():])
            if found:
                content += body[: tag.start()]
    if found is None:
        trailing = _trailing_json_calls(body)
        if trailing is not None:
            content, found = content + trailing[0], trailing[1]
    if not found:
        return text, []
    calls = [
        {"id": f"call_{i}", "type": "function", "function": {"name": name, "arguments": json.dumps(args, ensure_ascii=False)}}
        for i, (name, args) in enumerate(found)
    ]
    return content.strip() or None, calls


# ------------------------------------------------------------------------------------ Jinja templates


def render_jinja_template(
    template: str,
    messages: list[dict],
    add_generation_prompt: bool = True,
    tools: list[dict] | None = None,
    bos_token: str = "<|begin_of_text|>",
    **extra: Any,
) -> str:
    """Render a checkpoint's chat template in a sandbox (the template is untrusted input).

    The environment matches the one transformers uses: ``trim_blocks``, ``lstrip_blocks``, loop controls,
    a ``tojson`` that does not HTML-escape, ``raise_exception`` and ``strftime_now``. Encode the result with
    ``Tokenizer.encode_with_specials``. Any failure inside the template is a ``RequestError``.
    """
    import jinja2.ext
    from jinja2 import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str):
        raise RequestError(f"chat template: {message}")

    def tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def strftime_now(fmt: str) -> str:
        return datetime.now().strftime(fmt)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    try:
        compiled = env.from_string(template)
        return compiled.render(
            messages=messages, add_generation_prompt=add_generation_prompt, tools=tools, bos_token=bos_token, **extra
        )
    except RequestError:
        raise
    except TemplateError as exc:
        raise RequestError(f"chat template: {' '.join(str(exc).split())[:300]}") from None
    except Exception as exc:  # a template bug meeting these messages (e.g. iterating over null content)
        raise RequestError(f"chat template failed on these messages: {type(exc).__name__}: {' '.join(str(exc).split())[:300]}") from None
