"""GenerationConfig: the knobs of `generate()`, read from generation_config.json or a model config."""

from __future__ import annotations

import copy
import json
import os
from typing import Any

GENERATION_CONFIG_NAME = "generation_config.json"

# Field -> default. A field left at None for max_length means "20 new tokens" (transformers' default).
DEFAULTS: dict[str, Any] = {
    # length
    "max_length": None,
    "max_new_tokens": None,
    "min_length": 0,
    "min_new_tokens": None,
    "early_stopping": False,
    "max_time": None,
    "stop_strings": None,
    # strategy
    "do_sample": False,
    "num_beams": 1,
    "use_cache": True,
    "cache_implementation": None,  # None: the static CUDA decoder on CUDA; "static" anywhere; "dynamic" never
    "prefill_chunk_size": None,  # None: one forward, or on CUDA chunks when a sliding window is shorter than the prompt
    "compile_config": None,  # with "static" on CPU: any value compiles the decoder's step (minutes the first time)
    # logits processing
    "temperature": 1.0,
    "top_k": 50,
    "top_p": 1.0,
    "min_p": None,
    "typical_p": 1.0,
    "top_h": None,
    "epsilon_cutoff": 0.0,
    "eta_cutoff": 0.0,
    "repetition_penalty": 1.0,
    "no_repeat_ngram_size": 0,
    "bad_words_ids": None,
    "sequence_bias": None,
    "suppress_tokens": None,
    "begin_suppress_tokens": None,
    "forced_bos_token_id": None,
    "forced_eos_token_id": None,
    "exponential_decay_length_penalty": None,
    "remove_invalid_values": False,
    "renormalize_logits": False,
    "length_penalty": 1.0,
    # outputs
    "num_return_sequences": 1,
    "output_scores": False,
    "output_logits": False,
    "output_attentions": False,
    "output_hidden_states": False,
    "return_dict_in_generate": False,
    # special tokens
    "pad_token_id": None,
    "bos_token_id": None,
    "eos_token_id": None,
    # assisted decoding
    "num_assistant_tokens": 20,
    "prompt_lookup_num_tokens": None,
    "max_matching_ngram_size": None,  # None: 2, as in transformers
}
# transformers fields that cannot change what generate() returns here, so they are accepted and have no effect.
INERT: dict[str, str] = {
    "decoder_start_token_id": "encoder-decoder models only (transformers ignores it for decoder-only models too)",
    "is_assistant": "set by transformers on an assistant's own config",
    "num_assistant_tokens_schedule": "only how many tokens the assistant drafts per round; greedy output is the same",
    "assistant_confidence_threshold": "only how many tokens the assistant drafts per round; greedy output is the same",
    "assistant_lookbehind": "assistants with another tokenizer only, which maestrale refuses",
    "target_lookbehind": "assistants with another tokenizer only, which maestrale refuses",
    "max_cache_len": "sizes transformers' static cache; maestrale sizes its own to max_length",
    "disable_compile": "compilation settings: speed only",
    "continuous_batching_config": "settings of transformers' generate_batch server loop, not of generate()",
}
# transformers fields maestrale does not implement: a value other than these neutral ones makes generate() raise.
REFUSED: dict[str, tuple[tuple, str]] = {
    "use_mtp": ((None, False), "these models have no multi-token-prediction heads"),
    "cache_config": ((None, {}), "maestrale has no quantized or offloaded caches; remove it"),
    "encoder_repetition_penalty": ((None, 1.0), "it applies to encoder-decoder models only; remove it"),
    "encoder_no_repeat_ngram_size": ((None, 0), "it applies to encoder-decoder models only; remove it"),
    "token_healing": ((None, False), "token healing is not implemented; remove it"),
    "guidance_scale": ((None, 1.0), "classifier-free guidance is not implemented; remove it"),
    "watermarking_config": ((None,), "watermarking is not implemented; remove it"),
    "assistant_early_exit": ((None,), "early-exit self-speculation is not implemented; pass assistant_model instead"),
    "assistant_ensemble_weight": ((None,), "ensembling the assistant's probabilities is not implemented; remove it"),
    "speculation_type": ((None,), "only assistant_model and prompt_lookup_num_tokens speculate here; remove it"),
    "penalty_alpha": ((None,), "contrastive search is not implemented; use greedy, sampling or beam search"),
    "dola_layers": ((None,), "DoLa decoding is not implemented; remove it"),
    "diversity_penalty": ((None, 0.0), "group beam search is not implemented; remove it"),
    "num_beam_groups": ((None, 1), "group beam search is not implemented; remove it"),
    "constraints": ((None,), "constrained beam search is not implemented; try prefix_allowed_tokens_fn"),
    "force_words_ids": ((None,), "constrained beam search is not implemented; try prefix_allowed_tokens_fn"),
    "low_memory": ((None, False), "low-memory beam search is not implemented (transformers 5 refuses it too)"),
}
TOKEN_FIELDS = ("pad_token_id", "bos_token_id", "eos_token_id")


class GenerationConfig:
    """Settings of one `generate()` call.

    Unknown keys are kept but unused, as transformers keeps them; transformers' fields that maestrale does not
    implement (REFUSED) load too, and make `generate()` raise unless they hold a neutral value.
    """

    def __init__(self, **kwargs: Any):
        kwargs.pop("transformers_version", None)
        kwargs.pop("_from_model_config", None)
        for name, default in DEFAULTS.items():
            setattr(self, name, kwargs.pop(name, copy.deepcopy(default)))
        for name, value in kwargs.items():
            setattr(self, name, value)
        self.validate()

    # ----- construction -----
    @classmethod
    def from_model_config(cls, config) -> GenerationConfig:
        """The special token ids of a model config (the only generation settings a config carries)."""
        return cls(**{name: getattr(config, name, None) for name in TOKEN_FIELDS})

    @classmethod
    def from_dict(cls, config_dict: dict[str, Any], **kwargs: Any) -> GenerationConfig:
        return cls(**{**config_dict, **kwargs})

    @classmethod
    def from_pretrained(cls, pretrained_model_name: str | os.PathLike, config_file_name: str | None = None,
                        **kwargs: Any) -> GenerationConfig:
        """Read generation_config.json from a folder (or a JSON file path); keyword arguments override its values."""
        path = os.fspath(pretrained_model_name)
        if os.path.isdir(path):
            path = os.path.join(path, config_file_name or GENERATION_CONFIG_NAME)
        if not os.path.isfile(path):
            raise OSError(f"no generation config at {path}; save one with GenerationConfig.save_pretrained(folder)")
        with open(path, encoding="utf-8") as f:
            return cls.from_dict(json.load(f), **kwargs)

    def save_pretrained(self, save_directory: str | os.PathLike, config_file_name: str | None = None, **_: Any) -> None:
        os.makedirs(save_directory, exist_ok=True)
        path = os.path.join(save_directory, config_file_name or GENERATION_CONFIG_NAME)
        with open(path, "w", encoding="utf-8") as f:
            f.write(self.to_json_string())

    # ----- views -----
    def to_dict(self) -> dict[str, Any]:
        return {k: copy.deepcopy(v) for k, v in vars(self).items() if not k.startswith("_")}

    def to_diff_dict(self) -> dict[str, Any]:
        """Only the values that differ from the defaults (what generation_config.json stores)."""
        return {k: v for k, v in self.to_dict().items() if k not in DEFAULTS or DEFAULTS[k] != v}

    def to_json_string(self, use_diff: bool = True) -> str:
        return json.dumps(self.to_diff_dict() if use_diff else self.to_dict(), indent=2, sort_keys=True) + "\n"

    def __repr__(self) -> str:
        return f"GenerationConfig {self.to_json_string()}"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, GenerationConfig) and self.to_dict() == other.to_dict()

    def update(self, **kwargs: Any) -> dict[str, Any]:
        """Set the known fields among `kwargs`, validate, and return the others (model inputs, to the caller)."""
        unused = {}
        for name, value in kwargs.items():
            if name in DEFAULTS or name in INERT or name in REFUSED or hasattr(self, name):
                setattr(self, name, value)
            else:
                unused[name] = value
        self.validate()
        return unused

    # ----- checks -----
    def check_supported(self) -> None:
        """Raise on a transformers field set to something maestrale does not implement (it would be ignored)."""
        for name, (neutral, why) in REFUSED.items():
            value = getattr(self, name, None)
            if value is not None and value not in neutral:
                raise ValueError(f"GenerationConfig: {name}={value!r} is not supported by maestrale: {why}. Pass "
                                 f"{name}=None to generate() or drop it from generation_config.json")

    def validate(self) -> None:
        """Raise on settings that cannot work together; each message names the field and the fix."""
        def fail(message: str) -> None:
            raise ValueError(f"GenerationConfig: {message}")

        for name in ("max_length", "max_new_tokens", "min_length", "min_new_tokens", "no_repeat_ngram_size"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 0):
                fail(f"{name} must be a non-negative integer, got {value!r}")
        if self.max_new_tokens == 0:
            fail("max_new_tokens must be greater than 0; to only score the prompt, call the model itself")
        if self.num_beams is None or not isinstance(self.num_beams, int) or self.num_beams < 1:
            fail(f"num_beams must be a positive integer, got {self.num_beams!r}")
        if not isinstance(self.num_return_sequences, int) or self.num_return_sequences < 1:
            fail(f"num_return_sequences must be a positive integer, got {self.num_return_sequences!r}")
        if self.num_return_sequences > 1 and not self.do_sample and self.num_return_sequences > self.num_beams:
            fail(f"num_return_sequences={self.num_return_sequences} needs num_beams >= {self.num_return_sequences} "
                 "or do_sample=True (greedy decoding returns one sequence per prompt)")
        if self.top_p is not None and not 0.0 < self.top_p <= 1.0:
            fail(f"top_p must be in (0, 1], got {self.top_p!r}")
        if self.typical_p is not None and not 0.0 < self.typical_p <= 1.0:
            fail(f"typical_p must be in (0, 1], got {self.typical_p!r}")
        if self.min_p is not None and not 0.0 <= self.min_p <= 1.0:
            fail(f"min_p must be in [0, 1], got {self.min_p!r}")
        if self.top_k is not None and (not isinstance(self.top_k, int) or self.top_k < 0):
            fail(f"top_k must be a non-negative integer (0 disables it), got {self.top_k!r}")
        if self.temperature is not None and self.temperature <= 0.0 and self.do_sample:
            fail(f"temperature must be > 0 when sampling, got {self.temperature!r}; for greedy decoding set do_sample=False")
        if self.repetition_penalty is not None and self.repetition_penalty <= 0.0:
            fail(f"repetition_penalty must be > 0 (1.0 disables it), got {self.repetition_penalty!r}")
        if self.max_time is not None and self.max_time <= 0:
            fail(f"max_time must be a positive number of seconds, got {self.max_time!r}")
        if self.early_stopping not in (True, False, "never"):
            fail(f"early_stopping must be True, False or 'never', got {self.early_stopping!r}")
        if self.bad_words_ids is not None and (
            not isinstance(self.bad_words_ids, list) or not self.bad_words_ids
            or not all(isinstance(word, list) and word and all(isinstance(t, int) and t >= 0 for t in word)
                       for word in self.bad_words_ids)
        ):
            fail(f"bad_words_ids must be a non-empty list of non-empty lists of token ids, got {self.bad_words_ids!r}")
        if isinstance(self.stop_strings, str):
            self.stop_strings = [self.stop_strings]
        for name in ("epsilon_cutoff", "eta_cutoff"):
            value = getattr(self, name)
            if value is not None and not 0.0 <= value < 1.0:
                fail(f"{name} must be in [0, 1) (0 disables it), got {value!r}")
        if self.top_h is not None and not 0.0 < self.top_h <= 1.0:
            fail(f"top_h must be in (0, 1], got {self.top_h!r}")
        for name in ("suppress_tokens", "begin_suppress_tokens"):
            value = getattr(self, name)
            if value is not None and not (isinstance(value, (list, tuple))
                                          and all(isinstance(t, int) and t >= 0 for t in value)):
                fail(f"{name} must be a list of token ids, got {value!r}")
        penalty = self.exponential_decay_length_penalty
        if penalty is not None and not (isinstance(penalty, (list, tuple)) and len(penalty) == 2
                                        and isinstance(penalty[0], int) and isinstance(penalty[1], (int, float))):
            fail(f"exponential_decay_length_penalty must be (start_index, decay_factor), got {penalty!r}")
        for name in ("prompt_lookup_num_tokens", "max_matching_ngram_size", "prefill_chunk_size"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                fail(f"{name} must be a positive integer, got {value!r}")
        if self.num_assistant_tokens is None or self.num_assistant_tokens < 1:
            fail(f"num_assistant_tokens must be a positive integer, got {self.num_assistant_tokens!r}")
