"""Every shipped chat template renders the same text and ids as transformers, and raises where it raises."""

import json

import jinja2
import pytest
from conftest import TEMPLATES
from transformers import AutoTokenizer as HFAutoTokenizer
from transformers import PreTrainedTokenizerFast as HFFast

from maestrale.tokenization import AutoTokenizer, get_json_schema


def get_current_weather(location: str, unit: str = "celsius") -> dict:
    """
    Get the current weather in a given location.

    Args:
        location: The city and state,
            e.g. San Francisco, CA
        unit: The temperature unit (choices: ["celsius", "fahrenheit"])

    Returns:
        The weather report.
    """


WEATHER_SCHEMA = {"type": "function", "function": {"name": "get_time", "description": "The time somewhere.",
                                                  "parameters": {"type": "object", "properties": {
                                                      "tz": {"type": "string", "description": "A time zone"}},
                                                      "required": ["tz"]}}}
SYSTEM = {"role": "system", "content": "You are terse."}
TURNS = [{"role": "user", "content": "Hello!"}, {"role": "assistant", "content": "Hi. How can I help?"},
         {"role": "user", "content": "Tell me  a joke\nabout 日本."}]
TOOL_TURNS = [
    {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "tool_calls": [{"id": "abc123def", "type": "function", "function": {
        "name": "get_current_weather", "arguments": {"location": "Paris, France", "unit": "celsius"}}}]},
    {"role": "tool", "tool_call_id": "abc123def", "name": "get_current_weather", "content": "22.0"},
    {"role": "assistant", "content": "It is 22 °C."},
    {"role": "user", "content": "And tomorrow?"},
]
CASES = {
    "plain": dict(conversation=TURNS),
    "system": dict(conversation=[SYSTEM, *TURNS]),
    "generation_prompt": dict(conversation=[SYSTEM, *TURNS], add_generation_prompt=True),
    "continue": dict(conversation=[*TURNS, {"role": "assistant", "content": "Why did the "}],
                     continue_final_message=True),
    "continue_trailing_space": dict(conversation=[*TURNS[:2]], continue_final_message=True),
}
TOOL_CASES = {
    "tools": dict(conversation=[SYSTEM, *TOOL_TURNS], tools=[get_current_weather, WEATHER_SCHEMA]),
    "tools_no_system": dict(conversation=TOOL_TURNS, tools=[WEATHER_SCHEMA]),
}
BAD_CASES = {
    "order": dict(conversation=[TURNS[1], TURNS[0]]),
    "two_users": dict(conversation=[TURNS[0], TURNS[0]]),
    "both_flags": dict(conversation=TURNS, add_generation_prompt=True, continue_final_message=True),
}
TEMPLATE_VOCAB = {  # template -> tokenizer folder it is rendered with
    "Mistral-7B-Instruct-v0.1": "v1", "Mistral-7B-Instruct-v0.2": "v1", "Mixtral-8x7B-Instruct-v0.1": "v1",
    "Mistral-7B-Instruct-v0.3": "v3", "Ministral-8B-Instruct-2410": "tekken_240911", "Phi-3-mini-4k-instruct": "phi3",
}
WITH_TOOLS = ("Mistral-7B-Instruct-v0.3", "Ministral-8B-Instruct-2410")


@pytest.fixture(scope="module")
def pairs(folders):
    """(ours, transformers') tokenizer for each template."""
    from transformers.integrations.mistral.tokenizer import MistralConverter

    out = {}
    for name, vocab in TEMPLATE_VOCAB.items():
        template = (TEMPLATES / f"{name}.jinja").read_text()
        ours = AutoTokenizer.from_pretrained(folders[vocab], chat_template=template)
        if vocab.startswith("tekken"):
            backend = MistralConverter(str(folders[vocab] / "tekken.json")).converted()
            ref = HFFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                         pad_token="<pad>", chat_template=template)
        else:
            ref = HFAutoTokenizer.from_pretrained(folders[vocab], chat_template=template)
        out[name] = ours, ref
    return out


def _both(pairs, name, case):
    ours, ref = pairs[name]
    return [tok.apply_chat_template(**case, tokenize=False) for tok in (ours, ref)], \
        [tok.apply_chat_template(**case, return_dict=False) for tok in (ours, ref)]


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("name", list(TEMPLATE_VOCAB))
def test_templates_render_like_transformers(pairs, name, case):
    (text, ref_text), (ids, ref_ids) = _both(pairs, name, CASES[case])
    assert text == ref_text
    assert ids == ref_ids


@pytest.mark.parametrize("case", list(TOOL_CASES))
@pytest.mark.parametrize("name", WITH_TOOLS)
def test_tool_calls_render_like_transformers(pairs, name, case):
    (text, ref_text), (ids, ref_ids) = _both(pairs, name, TOOL_CASES[case])
    assert text == ref_text and "[AVAILABLE_TOOLS]" in text and "[TOOL_RESULTS]" in text
    assert ids == ref_ids


@pytest.mark.parametrize("case", list(BAD_CASES))
@pytest.mark.parametrize("name", [n for n in TEMPLATE_VOCAB if not n.startswith("Phi-3")])
def test_rejected_conversations_raise_like_transformers(pairs, name, case):
    ours, ref = pairs[name]
    with pytest.raises((jinja2.TemplateError, ValueError)) as theirs:
        ref.apply_chat_template(**BAD_CASES[case], tokenize=False)
    with pytest.raises(type(theirs.value)) as mine:
        ours.apply_chat_template(**BAD_CASES[case], tokenize=False)
    assert str(mine.value).split("\n")[0][:40] == str(theirs.value).split("\n")[0][:40]


@pytest.mark.parametrize("name", WITH_TOOLS)
def test_bad_tool_call_id_raises_like_transformers(pairs, name):
    bad = json.loads(json.dumps(TOOL_TURNS).replace("abc123def", "short"))
    ours, ref = pairs[name]
    with pytest.raises(jinja2.TemplateError, match="length 9"):
        ref.apply_chat_template(bad, tools=[WEATHER_SCHEMA], tokenize=False)
    with pytest.raises(jinja2.TemplateError, match="length 9"):
        ours.apply_chat_template(bad, tools=[WEATHER_SCHEMA], tokenize=False)


def test_batched_conversations_with_padding(pairs):
    ours, ref = pairs["Phi-3-mini-4k-instruct"]
    batch = [[SYSTEM, *TURNS], TURNS[:1]]
    mine = ours.apply_chat_template(batch, add_generation_prompt=True, padding=True, return_tensors="pt")
    theirs = ref.apply_chat_template(batch, add_generation_prompt=True, padding=True, return_tensors="pt")
    assert mine.keys() == theirs.keys()
    for key in mine:
        assert mine[key].tolist() == theirs[key].tolist()
    assert ours.apply_chat_template(batch, tokenize=False) == ref.apply_chat_template(batch, tokenize=False)
    assert ours.apply_chat_template(batch, truncation=True, max_length=5, return_dict=False) == \
        ref.apply_chat_template(batch, truncation=True, max_length=5, return_dict=False)


def test_return_shapes_like_transformers_5(pairs):
    ours, ref = pairs["Mistral-7B-Instruct-v0.3"]
    out = ours.apply_chat_template(TURNS, return_tensors="pt")
    expected = ref.apply_chat_template(TURNS, return_tensors="pt")
    assert out.input_ids.tolist() == expected["input_ids"].tolist() and out.input_ids.shape[0] == 1
    assert set(out) == set(expected) and dict(**out).keys() == out.keys()
    assert out.to("cpu") is out


def test_json_schema_from_function_matches_transformers():
    from typing import Literal, Optional, Union

    from transformers.utils import get_json_schema as hf_schema

    def plan(city: str, days: Optional[int] = None, mode: Literal["walk", "bike"] = "walk",
             stops: list[str] = None, budget: Union[int, float] = 0) -> list[str]:
        """Plan a trip.

        Longer text here.

        Args:
            city: Where to go,
                in full.
            days: How long
            mode: How to move
            stops: Places on the way
            budget: Money (choices: [10, 20])

        Returns:
            The itinerary.
        """

    assert get_json_schema(plan) == hf_schema(plan)
    assert get_json_schema(get_current_weather) == hf_schema(get_current_weather)

    def undocumented(x: int):
        pass

    with pytest.raises(ValueError, match="no docstring"):
        get_json_schema(undocumented)


def test_helpers_available_to_templates(pairs):
    ours, ref = pairs["Phi-3-mini-4k-instruct"]
    template = ("{{ messages[0].content | tojson }}|{{ strftime_now('%Y') | length }}|{{ bos_token }}"
                "{% for m in messages %}{% if loop.index > 1 %}{% break %}{% endif %}{{ m.role }}{% endfor %}")
    assert ours.apply_chat_template(TURNS, chat_template=template, tokenize=False) == \
        ref.apply_chat_template(TURNS, chat_template=template, tokenize=False)
    with pytest.raises(jinja2.TemplateError, match="boom"):
        ours.apply_chat_template(TURNS, chat_template="{{ raise_exception('boom') }}", tokenize=False)


@pytest.mark.parametrize("attack", [
    "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "{{ messages.__class__.__init__.__globals__ }}",
    "{{ raise_exception.__globals__['__builtins__']['open']('/etc/passwd').read() }}",
    "{% set ns = namespace() %}{% set ns.__class__ = 1 %}",
    "{{ messages.append({'role': 'user'}) }}",
    "{{ cycler.__init__.__globals__.os.popen('id').read() }}",
])
def test_sandbox_stops_templates_reaching_python(pairs, attack):
    ours, _ = pairs["Phi-3-mini-4k-instruct"]
    with pytest.raises(jinja2.exceptions.SecurityError):
        ours.apply_chat_template(TURNS, chat_template=attack, tokenize=False)


@pytest.mark.parametrize("attack", ["{% include '/etc/passwd' %}", "{% import '/etc/hosts' as h %}",
                                    "{% extends '/etc/passwd' %}"])
def test_sandbox_has_no_file_access(pairs, attack):
    ours, _ = pairs["Phi-3-mini-4k-instruct"]
    with pytest.raises((TypeError, jinja2.TemplateError), match="loader|not found|passwd|hosts"):
        ours.apply_chat_template(TURNS, chat_template=attack, tokenize=False)


def test_no_template_is_a_clear_error(folders):
    with pytest.raises(ValueError, match="no chat template"):
        AutoTokenizer.from_pretrained(folders["v1"]).apply_chat_template(TURNS)


# Phi-3's and Mistral v0.3's templates with the assistant's text inside {% generation %} blocks, as training
# templates write them.
GENERATION_TEMPLATES = {
    "Phi-3-mini-4k-instruct": (TEMPLATES / "Phi-3-mini-4k-instruct.jinja").read_text().replace(
        "{{'<|assistant|>\n' + message['content'] + '<|end|>\n'}}",
        "{{'<|assistant|>\n'}}{% generation %}{{message['content'] + '<|end|>'}}{% endgeneration %}{{'\n'}}"),
    "Mistral-7B-Instruct-v0.3": (TEMPLATES / "Mistral-7B-Instruct-v0.3.jinja").read_text().replace(
        '{{- " " + message["content"]|trim + eos_token}}',
        '{{- " " }}{% generation %}{{ message["content"]|trim + eos_token }}{% endgeneration %}'),
}
MASK_CASES = {
    "one": dict(conversation=[SYSTEM, *TURNS, {"role": "assistant", "content": "No."}]),
    "batch_padded": dict(conversation=[[SYSTEM, *TURNS], TURNS[:2]], padding=True),
    "tensors": dict(conversation=[TURNS[:2], [*TURNS, {"role": "assistant", "content": "ok"}]], padding=True,
                    return_tensors="pt"),
    "truncated": dict(conversation=[SYSTEM, *TURNS, {"role": "assistant", "content": "No."}], truncation=True,
                      max_length=14),
    "generation_prompt": dict(conversation=TURNS, add_generation_prompt=True),
}


@pytest.mark.parametrize("name,case", [(name, case) for name in GENERATION_TEMPLATES for case in MASK_CASES
                                       if name.startswith("Phi-3") or "padding" not in MASK_CASES[case]])
def test_assistant_tokens_mask_like_transformers(pairs, name, case):  # (the v0.3 folder has no pad token)
    ours, ref = pairs[name]
    template = GENERATION_TEMPLATES[name]
    assert "{% generation %}" in template
    kwargs = dict(MASK_CASES[case], chat_template=template, return_assistant_tokens_mask=True)
    mine, theirs = ours.apply_chat_template(**kwargs), ref.apply_chat_template(**kwargs)
    assert mine.keys() == theirs.keys() and "assistant_masks" in mine
    for key in mine:
        value, expected = mine[key], theirs[key]
        assert (value.tolist() if hasattr(value, "tolist") else value) == \
            (expected.tolist() if hasattr(expected, "tolist") else expected), key
    if case == "one":  # the marked tokens decode to the assistant's turns
        marked = [i for i, m in zip(mine["input_ids"], mine["assistant_masks"]) if m]
        assert "How can I help?" in ours.decode(marked) and "No." in ours.decode(marked)
    # Without the mask the blocks render as their body.
    assert ours.apply_chat_template(MASK_CASES["one"]["conversation"], chat_template=template, tokenize=False) == \
        ref.apply_chat_template(MASK_CASES["one"]["conversation"], chat_template=template, tokenize=False)


def test_assistant_tokens_mask_errors(pairs):
    ours, _ = pairs["Phi-3-mini-4k-instruct"]
    template = GENERATION_TEMPLATES["Phi-3-mini-4k-instruct"]
    with pytest.raises(ValueError, match="return_assistant_tokens_mask"):
        ours.apply_chat_template(TURNS, chat_template=template, return_assistant_tokens_mask=True, tokenize=False)
    with pytest.raises(ValueError, match="return_assistant_tokens_mask"):
        ours.apply_chat_template(TURNS[:2], chat_template=template, return_assistant_tokens_mask=True,
                                 continue_final_message=True)
