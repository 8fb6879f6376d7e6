"""The Llama 4 chat format, tool-call parsing, and Jinja chat templates.

Layout (both references): ``<|begin_of_text|>`` once, then per message
``<|header_start|>{role}<|header_end|>\\n\\n{content}`` closed by ``<|eot|>`` or ``<|eom|>``, then the
generation prompt ``<|header_start|>assistant<|header_end|>\\n\\n``. Role ``tool`` is written ``ipython``.

Tool calls — herd follows **Meta's reference** (``llama_models`` ChatFormat) by default (``style="meta"``):

* an assistant tool call is appended after the content as ``{"type": "function", "name": N,
  "parameters": {...}}`` and the message ends with ``<|eom|>``; a tool result ends with ``<|eom|>``.

The Hugging Face chat template (``style="hf"``) differs:

* the call is written ``<|python_start|>{content}<|python_end|>{"name": N, "parameters": {...}}`` (no
  "type" key) and ends with ``<|eot|>``; tool results end with ``<|eot|>``;
* tool-result content goes through ``tojson``, so a string result becomes a quoted JSON string.

Either way, generated calls are read back by ``parse_tool_calls``, which accepts both forms, a JSON list
of calls, and the pythonic ``[f(a="x")]`` form. Message text is encoded as plain text: special-token text
typed by a user stays text.
"""

from __future__ import annotations

import ast
import json
import re
from datetime import datetime
from typing import Any

from ..errors import RequestError
from .tokenizer import Tokenizer

ROLES = ("system", "user", "assistant", "tool", "ipython")


def _text_of(content: Any, where: str) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            if isinstance(part, str):
                parts.append(part)
            elif isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str):
                parts.append(part["text"])
            elif isinstance(part, dict) and part.get("type") in ("image_url", "image"):
                raise RequestError(f"{where}: images are not supported yet")
            else:
                raise RequestError(f"{where}: content parts must be {{'type': 'text', 'text': str}}")
        return "".join(parts)
    raise RequestError(f"{where}: content must be a string, a list of parts or null, got {type(content).__name__}")


def _call_of(call: Any, where: str) -> tuple[str, Any]:
    """OpenAI tool call -> (name, arguments object)."""
    fn = call.get("function") if isinstance(call, dict) else None
    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
        raise RequestError(f"{where}: each tool call needs function.name")
    args = fn.get("arguments", "{}")
    if isinstance(args, str):
        try:
            args = json.loads(args) if args.strip() else {}
        except ValueError:
            raise RequestError(f"{where}: function.arguments is not valid JSON") from None
    return fn["name"], args


class ChatFormat:
    """Encodes OpenAI-style message lists into Llama 4 prompt token ids."""

    def __init__(self, tokenizer: Tokenizer, style: str = "meta"):
        if style not in ("meta", "hf"):
            raise ValueError(f"style must be 'meta' or 'hf', got {style!r}")
        self.tok, self.style = tokenizer, style
        self._header_start = tokenizer.token_id("<|header_start|>")
        self._header_end = tokenizer.token_id("<|header_end|>")
        self._eot = tokenizer.token_id("<|eot|>")
        self._eom = tokenizer.token_id("<|eom|>")

    def header(self, role: str) -> list[int]:
        role = "ipython" if role == "tool" else role
        return [self._header_start, *self.tok.encode(role), self._header_end, *self.tok.encode("\n\n")]

    def encode_message(self, message: dict, index: int = 0) -> list[int]:
        where = f"messages[{index}]"
        if not isinstance(message, dict):
            raise RequestError(f"{where}: expected an object with 'role' and 'content'")
        role = message.get("role")
        if role == "developer":
            role = "system"
        if role not in ROLES:
            raise RequestError(f"{where}: unknown role {role!r} (expected system, user, assistant or tool)")
        text = _text_of(message.get("content"), where)
        calls = message.get("tool_calls") or []
        if calls and role != "assistant":
            raise RequestError(f"{where}: only assistant messages carry tool_calls")
        ids = self.header(role)
        if self.style == "meta":
            ids += self.tok.encode(text)
            for call in calls:
                name, args = _call_of(call, where)
                ids += self.tok.encode(json.dumps({"type": "function", "name": name, "parameters": args}))
            eom = bool(calls) or role in ("tool", "ipython")
        else:
            if calls:
                ids += [self.tok.token_id("<|python_start|>"), *self.tok.encode(text), self.tok.token_id("<|python_end|>")]
                for call in calls:
                    name, args = _call_of(call, where)
                    ids += self.tok.encode(json.dumps({"name": name, "parameters": args}))
            elif role in ("tool", "ipython"):
                ids += self.tok.encode(json.dumps(text))
            else:
                ids += self.tok.encode(text.strip() if role == "system" else text)
            eom = False
        ids.append(self._eom if eom else self._eot)
        return ids

    def encode_dialog(self, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
        if not isinstance(messages, list):
            raise RequestError("messages: expected a list of message objects")
        ids = [self.tok.bos_id]
        for i, message in enumerate(messages):
            ids += self.encode_message(message, i)
        if add_generation_prompt:
            ids += self.header("assistant")
        return ids


# ------------------------------------------------------------------------------------ tool-call parsing


def _as_call(obj: Any) -> tuple[str, Any] | None:
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    if obj.get("type", "function") != "function":
        return None
    args = obj.get("parameters", obj.get("arguments", {}))
    if isinstance(args, str):
        try:
            args = json.loads(args)
        except ValueError:
            return None
    if not isinstance(args, dict):
        return None
    return obj["name"], args


def _pythonic_calls(text: str) -> list[tuple[str, Any]] | None:
    """``[f(a="x", b=1), g()]`` -> [(f, {...}), (g, {})], or None if it is not exactly that."""
    try:
        tree = ast.parse(text.strip(), mode="eval")
    except SyntaxError:
        return None
    if not isinstance(tree.body, ast.List) or not tree.body.elts:
        return None
    calls = []
    for node in tree.body.elts:
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and not node.args):
            return None
        try:
            args = {kw.arg: ast.literal_eval(kw.value) for kw in node.keywords}
        except ValueError:
            return None
        if any(k is None for k in args):
            return None
        calls.append((node.func.id, args))
    return calls


def parse_tool_calls(text: str) -> tuple[str | None, list[dict]]:
    """Generated assistant text -> (content or None, OpenAI-style tool_calls)."""
    body = text.strip()
    content: str | None = None
    m = re.match(r"^<\|python_start\|>(.*?)<\|python_end\|>(.*)$", body, re.S)
    if m:
        content = m.group(1).strip() or None
        body = m.group(2).strip() or m.group(1).strip()
        if not m.group(2).strip():
            content = None
    else:
        body = body.replace("<|python_start|>", "").replace("<|python_end|>", "").strip()
    found: list[tuple[str, Any]] | None = None
    try:
        obj = json.loads(body)
    except ValueError:
        obj = None
    if obj is not None:
        items = obj if isinstance(obj, list) else [obj]
        parsed = [_as_call(item) for item in items]
        if items and all(parsed):
            found = parsed  # type: ignore[assignment]
    if found is None:
        found = _pythonic_calls(body)
    if not found:
        return text, []
    calls = [
        {"id": f"call_{i}", "type": "function", "function": {"name": name, "arguments": json.dumps(args, ensure_ascii=False)}}
        for i, (name, args) in enumerate(found)
    ]
    return content, calls


# ------------------------------------------------------------------------------------ Jinja templates


def render_jinja_template(
    template: str,
    messages: list[dict],
    add_generation_prompt: bool = True,
    tools: list[dict] | None = None,
    bos_token: str = "<|begin_of_text|>",
    **extra: Any,
) -> str:
    """Render a checkpoint's chat template in a sandbox (the template is untrusted input)."""
    from jinja2 import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str):
        raise RequestError(f"chat template: {message}")

    def tojson(value, indent=None, ensure_ascii=False):
        return json.dumps(value, indent=indent, ensure_ascii=ensure_ascii)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(template).render(
            messages=messages, add_generation_prompt=add_generation_prompt, tools=tools, bos_token=bos_token, **extra
        )
    except TemplateError as exc:
        raise RequestError(f"chat template: {' '.join(str(exc).split())}") from None
