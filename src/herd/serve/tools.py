"""Telling the model about the request's tools: a system block listing the functions as JSON schemas.

Llama 4 has no tool tokens of its own for custom functions; it answers a call as JSON
(``{"name": ..., "parameters": {...}}``), which ``herd.tokenizer.chat.parse_tool_calls`` reads back.
"""

from __future__ import annotations

import json
from typing import Any


def tools_block(functions: list[dict[str, Any]], tool_choice: Any = None) -> str:
    specs = "\n\n".join(json.dumps({"type": "function", "function": f}, ensure_ascii=False) for f in functions)
    lines = [
        "You can call these functions:",
        "",
        specs,
        "",
        'To call a function, reply with only a JSON object {"name": <function name>, "parameters": <arguments object>} '
        "and nothing else. Otherwise, answer normally.",
    ]
    if tool_choice == "required":
        lines.append("You must call one of the functions.")
    elif isinstance(tool_choice, dict) or hasattr(tool_choice, "function"):
        name = tool_choice["function"]["name"] if isinstance(tool_choice, dict) else tool_choice.function.name
        lines.append(f"You must call the function {name}.")
    return "\n".join(lines)


def messages_with_tools(messages: list[dict], functions: list[dict], tool_choice: Any = None) -> list[dict]:
    """Prepend the tools block to the system message (creating one if the dialog has none)."""
    block = tools_block(functions, tool_choice)
    out = [dict(m) for m in messages]
    if out and out[0]["role"] == "system" and isinstance(out[0].get("content"), str):
        out[0]["content"] = f"{out[0]['content']}\n\n{block}"
    else:
        out.insert(0, {"role": "system", "content": block})
    return out
