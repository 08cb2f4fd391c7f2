"""Mistral's tool calls in a model's output, as OpenAI `tool_calls`.

After the `[TOOL_CALLS]` token, Mistral models write either a JSON list, `[{"name": ..., "arguments": {...}}]`
(v3 and v7 tokenizers), or `name[ARGS]{...}` per call, each after its own `[TOOL_CALLS]` (v11 and later, with an
optional `[CALL_ID]id` before `[ARGS]`).
"""

from __future__ import annotations

import json
import secrets
import string

TOOL_CALLS = "[TOOL_CALLS]"
_ALPHANUMERIC = string.ascii_letters + string.digits


def call_id() -> str:
    """Nine alphanumeric characters: what Mistral's chat templates require of a tool call's id."""
    return "".join(secrets.choice(_ALPHANUMERIC) for _ in range(9))


def _call(name: str, arguments, id_: str | None = None) -> dict:
    if not isinstance(arguments, str):
        arguments = json.dumps(arguments, ensure_ascii=False)
    return {"id": id_ or call_id(), "type": "function", "function": {"name": name, "arguments": arguments}}


def parse_tool_calls(text: str) -> list[dict] | None:
    """The calls in `text`, the output after its first [TOOL_CALLS] decoded with special tokens; None when they
    do not parse (the text is then returned as content)."""
    text = text.strip()
    try:
        if text.startswith("["):
            calls = json.JSONDecoder().raw_decode(text)[0]
            return [_call(c["name"], c.get("arguments", {}), c.get("id")) for c in calls]
        out = []
        for piece in text.split(TOOL_CALLS):
            head, args = piece.split("[ARGS]", 1)
            name, _, id_ = head.partition("[CALL_ID]")
            out.append(_call(name.strip(), json.JSONDecoder().raw_decode(args.strip())[0], id_.strip() or None))
        return out
    except (ValueError, KeyError, TypeError, AttributeError):
        return None


def template_messages(messages: list[dict]) -> list[dict]:
    """OpenAI messages as chat templates take them: tool-call arguments as objects, not JSON strings."""
    out = []
    for message in messages:
        message = dict(message)
        if message.get("tool_calls"):
            calls = []
            for call in message["tool_calls"]:
                function = dict(call["function"])
                if isinstance(function.get("arguments"), str):
                    try:
                        function["arguments"] = json.loads(function["arguments"])
                    except ValueError:
                        pass  # left as written: the template shows it as a string
                calls.append({**call, "function": function})
            message["tool_calls"] = calls
        out.append(message)
    return out
