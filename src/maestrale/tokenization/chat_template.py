"""Chat templates: Jinja rendering in a sandbox, with the helpers transformers gives templates, and tool schemas
from Python functions."""

from __future__ import annotations

import inspect
import json
import re
import types
import typing
from collections.abc import Callable, Mapping
from contextvars import ContextVar
from datetime import datetime
from functools import lru_cache
from typing import Any

import jinja2
from jinja2 import nodes
from jinja2.ext import Extension, loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

# Appended to the final message when continuing it, so that its end can be found in the rendered text.
CONTINUE_TAG = "CONTINUE_FINAL_MESSAGE_TAG "


def raise_exception(message: str):
    raise jinja2.exceptions.TemplateError(message)


def tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None, separators=None,
           sort_keys: bool = False) -> str:
    # Jinja's own tojson escapes HTML characters, which would change what the model sees.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def strftime_now(format: str) -> str:
    return datetime.now().strftime(format)


class SafeNamespace(jinja2.utils.Namespace):
    """`namespace()` that refuses underscore names, which could otherwise reach Python internals."""

    def __init__(*args: Any, **kwargs: Any):
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            SafeNamespace._check(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        SafeNamespace._check(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name: Any) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"Chat templates may not set the attribute {name!r} on a namespace")


# While a conversation renders for an assistant mask: the text emitted so far, and the (start, end) character span of
# each {% generation %} block.
_generation = ContextVar("generation_spans", default=None)


class GenerationBlocks(Extension):
    """`{% generation %}...{% endgeneration %}` around the assistant's text: rendered as its body, and recorded when
    an assistant mask is asked for."""

    tags = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return nodes.CallBlock(self.call_method("_record"), [], [], body).set_lineno(lineno)

    @staticmethod
    def _record(caller: Callable[[], str]) -> str:
        text = caller()
        recording = _generation.get()
        if recording is not None:
            emitted, spans = recording
            start = sum(map(len, emitted))
            spans.append((start, start + len(text)))
        return text


@lru_cache(maxsize=32)
def compile_template(source: str) -> jinja2.Template:
    # trim_blocks/lstrip_blocks and loop controls: the settings transformers renders templates with.
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[loopcontrols, GenerationBlocks])
    env.filters["tojson"] = tojson
    env.globals.update(raise_exception=raise_exception, strftime_now=strftime_now, namespace=SafeNamespace)
    return env.from_string(source)


def select_template(own: str | dict[str, str] | None, requested: str | None, tools: list | None) -> str:
    """The template text: `requested` (text or the name of one of the tokenizer's templates) or the tokenizer's
    default ("tool_use" when tools are given and the tokenizer has one)."""
    if isinstance(own, dict):
        if requested is not None and requested in own:
            return own[requested]
        if requested is not None:
            return requested
        name = "tool_use" if tools is not None and "tool_use" in own else "default"
        if name not in own:
            raise ValueError(f"This tokenizer has named chat templates {sorted(own)} and none is 'default': pass "
                             "chat_template=<name>")
        return own[name]
    if requested is not None:
        return requested
    if own is None:
        raise ValueError(
            "This tokenizer has no chat template (no chat_template in tokenizer_config.json and no "
            "chat_template.jinja). Set tokenizer.chat_template or pass chat_template=..."
        )
    return own


def plain(value: Any) -> Any:
    """Inputs rebuilt from plain JSON types, so that the sandboxed template cannot call methods of rich objects."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    for kind in (bool, str, int, float):
        if isinstance(value, kind):
            return kind(value)
    if isinstance(value, Mapping):
        return {plain(k): plain(v) for k, v in value.items()}
    if isinstance(value, tuple):
        return tuple(plain(v) for v in value)
    if isinstance(value, list):
        return [plain(v) for v in value]
    if hasattr(value, "item") and callable(value.item) and getattr(value, "shape", None) == ():
        return plain(value.item())  # numpy scalars
    if callable(getattr(value, "model_dump", None)):
        return plain(value.model_dump())
    return f"<{type(value).__name__}>"


def render_conversations(template: str, conversations: list[list[dict[str, Any]]], tools: list | None = None,
                         documents: list[dict[str, str]] | None = None, add_generation_prompt: bool = False,
                         continue_final_message: bool = False, template_kwargs: dict[str, Any] | None = None,
                         generation_spans: list | None = None) -> list[str]:
    """Render each conversation; with `continue_final_message` the text stops at the end of the last message.
    `generation_spans`, a list, receives per conversation the character spans of its {% generation %} blocks."""
    if continue_final_message and add_generation_prompt:
        raise ValueError("continue_final_message and add_generation_prompt cannot be used together: the first "
                         "continues the last message, the second starts a new assistant turn")
    if continue_final_message and generation_spans is not None:
        raise ValueError("continue_final_message cannot be used with return_assistant_tokens_mask: the mask needs "
                         "the assistant's turns whole")
    if not conversations or any(len(c) == 0 for c in conversations):
        raise ValueError("Cannot apply a chat template to an empty conversation: give at least one message")
    compiled = compile_template(template)
    schemas = None if tools is None else plain([tool_schema(t) for t in tools])
    documents = plain(documents)
    extra = plain(template_kwargs or {})
    out = []
    for conversation in conversations:
        # Missing keys are what templates test for; OpenAI-style `None` values would render as "None".
        chat = [{k: v for k, v in plain(m).items() if v is not None} if isinstance(m, Mapping) else m
                for m in conversation]
        for message in chat:
            if not isinstance(message, dict):
                raise TypeError(f"Chat messages must be dicts with 'role' and 'content'; got {message!r}")
        final = None
        if continue_final_message:
            final = chat[-1].get("content")
            if isinstance(final, list):  # content blocks: continue the last text block
                blocks = [b for b in final if isinstance(b, dict) and "text" in b]
                if not blocks:
                    raise ValueError("continue_final_message is set but the final message has no text to continue")
                final = blocks[-1]["text"]
                blocks[-1]["text"] = final + CONTINUE_TAG
            elif isinstance(final, str):
                chat[-1]["content"] = final + CONTINUE_TAG
            else:
                raise ValueError('continue_final_message is set but the final message has no "content" to continue')
        variables = dict(messages=chat, tools=schemas, documents=documents,
                         add_generation_prompt=add_generation_prompt, **extra)
        if generation_spans is None:
            text = compiled.render(**variables)
        else:
            # Rendered piece by piece, so that a generation block knows how much text came before it.
            emitted, spans = [], []
            recording = _generation.set((emitted, spans))
            try:
                emitted.extend(compiled.generate(**variables))
            finally:
                _generation.reset(recording)
            text = "".join(emitted)
            generation_spans.append(spans)
        if final is not None:
            if final.strip() not in text or CONTINUE_TAG.strip() not in text:
                raise ValueError("continue_final_message is set but the chat template dropped part of the final "
                                 f"message, so it cannot be continued. Final message: {final.strip()!r}")
            cut = text.rindex(CONTINUE_TAG.strip())
            text = text[:cut] if text[cut:cut + len(CONTINUE_TAG)] == CONTINUE_TAG else text[:cut].rstrip()
        out.append(text)
    return out


# ----- tools: Python functions to JSON schemas ------------------------------------------------------------------

JSON_TYPES = {str: "string", int: "integer", float: "number", bool: "boolean", dict: "object", list: "array",
              type(None): "null", Any: None}
ARGS_SECTION = re.compile(r"\n\s*Args:\s*\n(.*?)(?=\n\s*(?:Returns?|Raises?|Yields?|Examples?):|\Z)", re.S)
RETURNS_SECTION = re.compile(r"\n\s*Returns?:\s*\n(.*?)(?=\n\s*(?:Raises?|Yields?|Examples?):|\Z)", re.S)
ARG_LINE = re.compile(r"^\s*(\w+)\s*(?:\([^)]*\))?\s*:\s*(.*)$")
CHOICES = re.compile(r"\(choices:\s*(.*?)\)\s*$", re.I | re.S)


def tool_schema(tool: dict | Callable) -> dict:
    if isinstance(tool, dict):
        return tool
    if inspect.isfunction(tool) or inspect.ismethod(tool):
        return get_json_schema(tool)
    raise ValueError(f"Tools must be JSON schemas (dicts) or Python functions with type hints and a docstring; "
                     f"got {type(tool).__name__}")


def _type_schema(hint: Any) -> dict[str, Any]:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        kinds = [a for a in args if a is not type(None)]
        schema = _type_schema(kinds[0]) if len(kinds) == 1 else {"type": [_type_schema(a)["type"] for a in kinds]}
        if len(kinds) < len(args):
            schema["nullable"] = True
        return schema
    if origin is typing.Literal:
        values = list(args)
        return {"type": JSON_TYPES[type(values[0])], "enum": values}
    if origin in (list, tuple, set):
        return {"type": "array", **({"items": _type_schema(args[0])} if args else {})}
    if origin is dict:
        return {"type": "object", **({"additionalProperties": _type_schema(args[1])} if len(args) == 2 else {})}
    if hint in JSON_TYPES:
        return {} if JSON_TYPES[hint] is None else {"type": JSON_TYPES[hint]}
    raise TypeError(f"Cannot express the type hint {hint!r} as a JSON schema type")


def get_json_schema(function: Callable) -> dict[str, Any]:
    """A tool's JSON schema from its signature and Google-style docstring (summary, `Args:`, `Returns:`)."""
    name = function.__name__
    doc = inspect.getdoc(function)
    if not doc:
        raise ValueError(f"Cannot make a JSON schema for {name}: it has no docstring")
    doc = "\n" + doc
    described = {}
    args = ARGS_SECTION.search(doc)
    if args:
        current = None
        for line in args.group(1).splitlines():
            match = ARG_LINE.match(line)
            if match:
                current = match.group(1)
                described[current] = match.group(2).strip()
            elif current and line.strip():
                described[current] += " " + line.strip()
    summary = re.split(r"\n\s*(?:Args|Returns?|Raises?):\s*\n", doc)[0].strip()

    hints = typing.get_type_hints(function)
    properties, required = {}, []
    for param in inspect.signature(function).parameters.values():
        if param.name in ("self", "cls"):
            continue
        if param.name not in hints:
            raise ValueError(f"Cannot make a JSON schema for {name}: argument {param.name!r} has no type hint")
        schema = _type_schema(hints[param.name])
        text = described.get(param.name)
        if text is None:
            raise ValueError(f"Cannot make a JSON schema for {name}: argument {param.name!r} is not described "
                             "in the docstring's Args: section")
        choices = CHOICES.search(text)
        if choices:
            schema["enum"] = json.loads(choices.group(1))
            text = text[: choices.start()].strip()
        schema["description"] = text
        properties[param.name] = schema
        if param.default is inspect.Parameter.empty:
            required.append(param.name)

    function_schema: dict[str, Any] = {"name": name, "description": summary,
                                       "parameters": {"type": "object", "properties": properties}}
    if required:
        function_schema["parameters"]["required"] = required
    if "return" in hints:
        returns = _type_schema(hints["return"])
        found = RETURNS_SECTION.search(doc)
        if found:
            returns["description"] = " ".join(found.group(1).split())
        function_schema["return"] = returns
    return {"type": "function", "function": function_schema}
