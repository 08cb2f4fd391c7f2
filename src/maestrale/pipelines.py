"""pipeline("text-generation"): prompts or chats in, records of generated text out, as transformers' pipeline gives."""

from __future__ import annotations

import os
from typing import Any

import torch

SUPPORTED_TASKS = ("text-generation",)
# What the pipeline generates with where neither the call nor the model's generation config says (transformers' values).
GENERATION_DEFAULTS = {"max_new_tokens": 256, "do_sample": True, "temperature": 0.7}
SAMPLING_KEYS = {"temperature", "top_k", "top_p", "min_p", "typical_p", "epsilon_cutoff", "eta_cutoff"}
# Call options that shape the returned text, with their defaults; every other option goes to generate().
TEXT_OPTIONS = {"return_full_text": True, "continue_final_message": None, "skip_special_tokens": True,
                "clean_up_tokenization_spaces": None}


def pipeline(task: str, model: Any = None, tokenizer: Any = None, *, device: int | str | torch.device | None = None,
             device_map: Any = None, dtype: torch.dtype | str | None = None, torch_dtype: torch.dtype | str | None = None,
             model_kwargs: dict[str, Any] | None = None, **kwargs: Any) -> "TextGenerationPipeline":
    """A text-generation pipeline over a maestrale model (or a folder / hub id to load one) and its tokenizer;
    other keyword arguments become defaults of every call (max_new_tokens=..., return_full_text=...)."""
    from .models import AutoModelForCausalLM
    from .tokenization import AutoTokenizer

    if task not in SUPPORTED_TASKS:
        raise ValueError(f"pipeline task {task!r} is not supported by maestrale; supported tasks: "
                         f"{', '.join(SUPPORTED_TASKS)}")
    if model is None:
        raise ValueError("pipeline needs model=: a maestrale causal LM, a local folder or a hub id")
    if isinstance(model, (str, os.PathLike)):
        options = dict(model_kwargs or {})
        for key, value in (("device_map", device_map), ("dtype", dtype), ("torch_dtype", torch_dtype)):
            if value is not None:
                options[key] = value
        model = AutoModelForCausalLM.from_pretrained(model, **options)
    if device is not None:
        if isinstance(device, int):  # transformers' convention: -1 is the CPU, n >= 0 the n-th GPU
            device = torch.device("cpu") if device < 0 else torch.device("cuda", device)
        model.to(device)
    if tokenizer is None:
        if not model.name_or_path:
            raise ValueError("pipeline cannot tell which tokenizer goes with a model not loaded by from_pretrained; "
                             "pass tokenizer= (a tokenizer, a folder or a hub id)")
        tokenizer = model.name_or_path
    if isinstance(tokenizer, (str, os.PathLike)):
        tokenizer = AutoTokenizer.from_pretrained(tokenizer)
    return TextGenerationPipeline(model, tokenizer, **kwargs)


class TextGenerationPipeline:
    """Continues a prompt, a chat (a list of {"role", "content"} messages), or a list of either, one at a time."""

    task = "text-generation"

    def __init__(self, model: Any, tokenizer: Any, **defaults: Any):
        self.model, self.tokenizer, self._defaults = model, tokenizer, defaults

    def __call__(self, text_inputs: str | list, **kwargs: Any) -> list:
        """[{"generated_text": ...}, ...] per input (one record per returned sequence), a list of those for a list of
        inputs; keyword arguments are the text options below or go to generate()."""
        single = isinstance(text_inputs, str) or (isinstance(text_inputs, (list, tuple)) and bool(text_inputs)
                                                 and isinstance(text_inputs[0], dict))
        options = {**self._defaults, **kwargs}
        text_options = {key: options.pop(key, default) for key, default in TEXT_OPTIONS.items()}
        results = [self._complete(prompt, options, **text_options)
                   for prompt in ([text_inputs] if single else text_inputs)]
        return results[0] if single else results

    def _complete(self, prompt: str | list[dict], options: dict[str, Any], return_full_text: bool,
                  continue_final_message: bool | None, skip_special_tokens: bool,
                  clean_up_tokenization_spaces: bool | None) -> list[dict[str, Any]]:
        if isinstance(prompt, str):
            inputs = self.tokenizer(prompt, return_tensors="pt")
        else:
            if not all(isinstance(m, dict) and "role" in m for m in prompt):
                raise TypeError("a chat passed to the text-generation pipeline must be a list of messages, each a "
                                "dict with 'role' and 'content'")
            if continue_final_message is None:  # a final assistant message is a prefill to continue
                continue_final_message = prompt[-1]["role"] == "assistant"
            inputs = self.tokenizer.apply_chat_template(prompt, add_generation_prompt=not continue_final_message,
                                                        continue_final_message=continue_final_message,
                                                        return_dict=True, return_tensors="pt")
        inputs = {k: v.to(self.model.device) for k, v in inputs.items() if k in ("input_ids", "attention_mask")}
        output = self.model.generate(inputs, **self._generate_kwargs(options))
        sequences = output if isinstance(output, torch.Tensor) else output.sequences
        prompt_length = inputs["input_ids"].shape[-1]
        records = []
        for sequence in sequences.tolist():
            text = self.tokenizer.decode(sequence[prompt_length:], skip_special_tokens=skip_special_tokens,
                                         clean_up_tokenization_spaces=clean_up_tokenization_spaces)
            if return_full_text and isinstance(prompt, str):
                text = prompt + text
            elif return_full_text and continue_final_message:
                text = [*prompt[:-1], {"role": prompt[-1]["role"], "content": prompt[-1]["content"] + text}]
            elif return_full_text:
                text = [*prompt, {"role": "assistant", "content": text}]
            records.append({"generated_text": text})
        return records

    def _generate_kwargs(self, options: dict[str, Any]) -> dict[str, Any]:
        """The call's options plus the pipeline defaults for what neither they nor the model's generation config set
        (sampling defaults only when sampling)."""
        already = {**self.model.generation_config.to_diff_dict(), **options}
        added = {key: value for key, value in GENERATION_DEFAULTS.items()
                 if key not in already and not (key == "max_new_tokens" and "max_length" in already)}
        if not {**already, **added}.get("do_sample"):
            added = {key: value for key, value in added.items() if key not in SAMPLING_KEYS}
        if "pad_token_id" not in already and self.tokenizer.pad_token_id is not None:
            added["pad_token_id"] = self.tokenizer.pad_token_id
        return {**options, **added}
