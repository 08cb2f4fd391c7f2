"""The server in this process (its engine in a child process, as in `maestrale serve`) on a tiny random Mistral
with Mistral's v3 tokenizer and chat template: tool calls round trip through the openai client, the API key, a full
queue. The model's replies are scripted by a test double of the engine's sampler (a random model would never write a
tool call)."""

import concurrent.futures
import contextlib
import functools
import json
import multiprocessing
import os
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from parity import mistral_v3_tokenizer

openai = pytest.importorskip("openai")
uvicorn = pytest.importorskip("uvicorn")

import maestrale  # noqa: E402
from maestrale.engine.llm_engine import LLMEngine  # noqa: E402
from maestrale.engine.sampling import Sampled, Sampler  # noqa: E402
from maestrale.serving.app import create_app  # noqa: E402
from maestrale.serving.async_engine import AsyncEngine  # noqa: E402

TEMPLATE = Path(__file__).parents[1] / "fixtures" / "chat_templates" / "Mistral-7B-Instruct-v0.3.jinja"
KEY = "secret-key"
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}


class Scripted(Sampler):
    """Answers every sequence with `script`, token by token, once `gate` is open; puts the prompts it sees in `seen`
    (it runs in the engine process: both are multiprocessing's)."""

    def __init__(self, script: list[int], gate, seen):
        self.script, self.gate, self.seen = script, gate, seen

    def __call__(self, seqs, logits):
        self.gate.wait()
        for seq in seqs:
            if not seq.output_ids:
                self.seen.put(seq.token_ids[: seq.num_prompt_tokens])
        return [Sampled(self.script[len(seq.output_ids) % len(self.script)]) for seq in seqs]


def scripted_engine(folder: str, script: list[int], gate, seen) -> LLMEngine:
    """The served engine (built in the engine process): a tiny random Mistral replying with `script`."""
    tokenizer = maestrale.AutoTokenizer.from_pretrained(folder)
    config = maestrale.MistralConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=48,
                                     num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                     bos_token_id=1, eos_token_id=2)
    engine = LLMEngine(maestrale.MistralForCausalLM(config).eval(), tokenizer, num_blocks=64, max_num_seqs=4)
    engine.sampler = Scripted(script, gate, seen)
    return engine


@pytest.fixture(scope="module")
def tokenizer_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("mistral_v3")
    mistral_v3_tokenizer(folder, chat_template=TEMPLATE.read_text())
    return folder


@pytest.fixture(scope="module")
def tokenizer(tokenizer_folder):
    return maestrale.AutoTokenizer.from_pretrained(tokenizer_folder)


class Served:
    """The test's handles on the served engine: its URL, the sampler's gate, the prompts the engine saw."""

    def __init__(self, url: str, gate, seen):
        self.url, self.gate, self._seen, self._prompts = url, gate, seen, []

    def last_prompt(self) -> list[int]:
        while not self._seen.empty():
            self._prompts.append(self._seen.get())
        return self._prompts[-1]


@contextlib.contextmanager
def serving(engine: AsyncEngine, tokenizer) -> Iterator[str]:
    """The URL of the app over `engine` on a free loopback port, uvicorn in a thread of this process."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    app = create_app(engine, tokenizer, "tiny-mistral", api_key=KEY)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join()


def scripted_server(tokenizer_folder, tokenizer, max_pending: int):
    """(AsyncEngine, gate, seen) of a model that replies with one call of get_weather for Paris."""
    call = ' [{"name": "get_weather", "arguments": {"city": "Paris"}}]'
    script = ([tokenizer.convert_tokens_to_ids("[TOOL_CALLS]")] + tokenizer(call, add_special_tokens=False)["input_ids"]
              + [2])
    context = multiprocessing.get_context("spawn")
    gate, seen = context.Event(), context.SimpleQueue()
    gate.set()
    build = functools.partial(scripted_engine, str(tokenizer_folder), script, gate, seen)
    return AsyncEngine(build, max_pending=max_pending), gate, seen


@pytest.fixture(scope="module")
def served(tokenizer_folder, tokenizer):
    engine, gate, seen = scripted_server(tokenizer_folder, tokenizer, max_pending=1)
    with serving(engine, tokenizer) as url:
        yield Served(url, gate, seen)


def client(url: str, key: str = KEY):
    return openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0)


def test_tool_call_round_trip(served, tokenizer):
    url = served.url
    messages = [{"role": "user", "content": "What is the weather in Paris?"}]
    reply = client(url).chat.completions.create(model="tiny-mistral", messages=messages, tools=[WEATHER],
                                                max_tokens=40)
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    (call,) = choice.message.tool_calls
    assert call.function.name == "get_weather" and json.loads(call.function.arguments) == {"city": "Paris"}
    assert len(call.id) == 9 and call.id.isalnum()
    assert "[AVAILABLE_TOOLS]" in tokenizer.decode(served.last_prompt())

    messages += [{"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
                 {"role": "tool", "tool_call_id": call.id, "content": '{"temperature": 21}'}]
    client(url).chat.completions.create(model="tiny-mistral", messages=messages, tools=[WEATHER], max_tokens=40)
    prompt = tokenizer.decode(served.last_prompt())
    calls = prompt[prompt.index("[TOOL_CALLS]"):prompt.index("[TOOL_RESULTS]")]
    for part in ('"name": "get_weather"', '"arguments": {"city": "Paris"}', f'"id": "{call.id}"'):
        assert part in calls
    assert '[TOOL_RESULTS] {"content": {"temperature": 21}, "call_id": "' + call.id in prompt


def test_tool_call_streamed(served):
    url = served.url
    stream = client(url).chat.completions.create(
        model="tiny-mistral", messages=[{"role": "user", "content": "Weather in Paris?"}], tools=[WEATHER],
        max_tokens=40, stream=True)
    chunks = list(stream)
    assert not any(c.choices[0].delta.content for c in chunks)  # the call's JSON is not streamed as content
    (call,) = chunks[-1].choices[0].delta.tool_calls
    assert call.function.name == "get_weather" and chunks[-1].choices[0].finish_reason == "tool_calls"


def test_without_tools_the_text_is_content(served):
    url = served.url
    reply = client(url).chat.completions.create(model="tiny-mistral", messages=[{"role": "user", "content": "Hi"}],
                                                max_tokens=40)
    assert reply.choices[0].finish_reason == "stop" and not reply.choices[0].message.tool_calls
    assert '"name": "get_weather"' in reply.choices[0].message.content


def test_api_key(served):
    url = served.url
    with pytest.raises(openai.AuthenticationError):
        client(url, "wrong").models.list()
    response = httpx.get(f"{url}/v1/models")
    assert response.status_code == 401 and response.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(f"{url}/health").status_code == 200
    assert client(url).models.list().data[0].id == "tiny-mistral"


def test_full_queue_gets_503_with_retry_after(served):
    url = served.url
    served.gate.clear()  # the first request holds the only place until the gate opens
    body = {"model": "tiny-mistral", "prompt": "one two", "max_tokens": 3, "stream": True}
    headers = {"authorization": f"Bearer {KEY}"}
    with httpx.stream("POST", f"{url}/v1/completions", json=body, headers=headers, timeout=30) as first:
        assert first.status_code == 200
        second = httpx.post(f"{url}/v1/completions", json=body, headers=headers)
        assert second.status_code == 503 and second.headers["retry-after"] == "1"
        assert second.json()["error"]["code"] == "server_overloaded"
        served.gate.set()
        assert first.read().decode().rstrip().endswith("data: [DONE]")


def test_stop_string_cuts_the_text_streamed_and_not(served):
    url = served.url
    kwargs = dict(model="tiny-mistral", prompt="Weather?", max_tokens=40, stop=['"city"', "never"])
    reply = client(url).completions.create(**kwargs)
    text = reply.choices[0].text
    assert text.endswith('"arguments": {') and reply.choices[0].finish_reason == "stop"
    assert "".join(c.choices[0].text for c in client(url).completions.create(**kwargs, stream=True)) == text


def test_a_dead_engine_fails_its_requests_and_health_says_so(tokenizer_folder, tokenizer):
    engine, gate, _ = scripted_server(tokenizer_folder, tokenizer, max_pending=4)
    gate.clear()  # the request below stays in flight
    headers = {"authorization": f"Bearer {KEY}"}
    body = {"model": "tiny-mistral", "prompt": "one two", "max_tokens": 3}
    with serving(engine, tokenizer) as url:
        assert httpx.get(f"{url}/health").json() == {"status": "ok"}
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            pending = pool.submit(httpx.post, f"{url}/v1/completions", json=body, headers=headers, timeout=30)
            while engine.in_flight == 0:
                time.sleep(0.05)
            engine._process.kill()
            failed = pending.result()
        assert failed.status_code == 500 and "engine process was killed by signal 9" in failed.json()["error"]["message"]
        health = httpx.get(f"{url}/health")
        assert health.status_code == 503 and "killed by signal 9" in health.json()["error"]
        again = httpx.post(f"{url}/v1/completions", json=body, headers=headers)
        assert again.status_code == 503 and again.json()["error"]["code"] == "engine_dead"


def _engine_environment() -> LLMEngine:
    raise RuntimeError(f"TOKENIZERS_PARALLELISM={os.environ.get('TOKENIZERS_PARALLELISM')}")


def test_the_engine_process_detokenizes_without_a_thread_pool(monkeypatch):
    """The engine process turns the tokenizers library's parallelism off (unless the user set it): a step's
    batch_decode of a few tokens a row is faster without its thread pool."""
    monkeypatch.delenv("TOKENIZERS_PARALLELISM", raising=False)
    with pytest.raises(RuntimeError, match="^TOKENIZERS_PARALLELISM=false$"):
        AsyncEngine(_engine_environment, max_pending=1).start()
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "true")
    with pytest.raises(RuntimeError, match="^TOKENIZERS_PARALLELISM=true$"):
        AsyncEngine(_engine_environment, max_pending=1).start()
