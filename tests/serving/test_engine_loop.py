"""The engine process's loop (serving/async_engine._EngineLoop) in this process, over a stand-in for its pipe: what
it sends equals the engine's own steps' outputs, the last texts included, with and without the overlap of a step's
model work and the previous outputs' texts (CUDA's path, driven here on CPU)."""

import pytest
from parity import mistral_v3_tokenizer

import maestrale
from maestrale.engine.llm_engine import LLMEngine, StepOutput
from maestrale.engine.sampling import Sampled, SamplingParams
from maestrale.serving.async_engine import _EngineLoop

REPLY = " The river runs past the old stone bridge, and then on to the sea."
REQUESTS = {"a": SamplingParams(max_tokens=7), "b": SamplingParams(max_tokens=12, n=2),
            "c": SamplingParams(max_tokens=3)}


class Pipe:
    """The server's end of the pipe: keeps the outputs the loop sends; once every choice has finished, says stop."""

    def __init__(self, choices: int):
        self.outputs, self.left, self.loop = [], choices, None

    def send(self, message):
        outputs, errors, _ = message
        assert not errors
        for fields in outputs:
            out = StepOutput(*fields)
            self.outputs.append((out.request_id, out.index, out.token_ids, out.text, out.finish_reason))
            self.left -= out.finish_reason is not None
        if not self.left:
            self.loop._commands.put(("stop",))
            self.loop._wake.set()


def engine(tokenizer) -> LLMEngine:
    """A tiny random Mistral replying REPLY to every prompt, token by token."""
    reply = tokenizer(REPLY, add_special_tokens=False)["input_ids"]
    config = maestrale.MistralConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=48,
                                     num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2, eos_token_id=2)
    out = LLMEngine(maestrale.MistralForCausalLM(config).eval(), tokenizer, num_blocks=64)
    out.sampler = lambda seqs, logits: [Sampled(reply[len(s.output_ids) % len(reply)]) for s in seqs]
    return out


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return mistral_v3_tokenizer(tmp_path_factory.mktemp("mistral_v3"))


@pytest.mark.parametrize("overlap", [False, True])
def test_the_loop_sends_every_text_of_streams_that_end_by_length(tokenizer, overlap):
    expected = []
    plain = engine(tokenizer)
    for request_id, params in REQUESTS.items():
        plain.add_request(request_id, [1, 5, 9], params)
    while plain.has_unfinished():
        expected += [(o.request_id, o.index, o.token_ids, o.text, o.finish_reason) for o in plain.step()]

    pipe = Pipe(sum(params.n for params in REQUESTS.values()))
    loop = pipe.loop = _EngineLoop(pipe)
    loop.engine = engine(tokenizer)
    for request_id, params in REQUESTS.items():
        loop._commands.put(("add", request_id, [1, 5, 9], params))
    loop.run(overlap)
    assert pipe.outputs == expected
    for request_id, params in REQUESTS.items():
        for index in range(params.n):
            steps = [o for o in pipe.outputs if o[:2] == (request_id, index)]
            assert steps[-1][4] == "length" and len(steps) == params.max_tokens and steps[-1][3]
            assert "".join(o[3] for o in steps) == tokenizer.decode([o[2][0] for o in steps])
