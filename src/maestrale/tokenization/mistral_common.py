"""MistralCommonBackend: the transformers tokenizer API over mistral-common's MistralTokenizer (tekken.json and
tokenizer.model.vN files).

As documented for transformers' class of the same name: no pairs of sequences, no `is_split_into_words`, no added
tokens, and special tokens are never parsed from text; options outside the documented ones raise.
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .batch import BatchEncoding
from .fast import VERY_LARGE_INTEGER, _padding_strategy, _to_id_list, _truncation_strategy, pad_encodings

TOKENIZER_FILE = re.compile(r"^(tekken\.json|tokenizer\.model\.v\d+m?\d*|.*tekken.*\.json)$")
HUB_OPTIONS = ("cache_dir", "revision", "token", "local_files_only", "force_download", "subfolder")


def _mistral_common():
    try:
        import mistral_common  # noqa: F401
    except ImportError:
        raise ImportError("MistralCommonBackend needs the mistral-common package: pip install 'maestrale[mistral-common]'"
                          " (or pip install mistral-common)") from None
    from mistral_common.protocol.instruct.request import ChatCompletionRequest
    from mistral_common.protocol.instruct.validator import ValidationMode
    from mistral_common.tokens.tokenizers.base import SpecialTokenPolicy
    from mistral_common.tokens.tokenizers.mistral import MistralTokenizer
    from mistral_common.tokens.tokenizers.tekken import Tekkenizer

    return MistralTokenizer, ValidationMode, SpecialTokenPolicy, ChatCompletionRequest, Tekkenizer


def _reject(method: str, kwargs: dict[str, Any]) -> None:
    if kwargs:
        raise ValueError(f"Options {sorted(kwargs)} are not supported by MistralCommonBackend.{method}")


class MistralCommonBackend:
    """Wraps `mistral_common.tokens.tokenizers.mistral.MistralTokenizer` with the transformers tokenizer API."""

    model_input_names = ["input_ids", "attention_mask"]

    def __init__(self, tokenizer_path: str | os.PathLike, mode: str = "test",
                 model_max_length: int = VERY_LARGE_INTEGER, padding_side: str = "left",
                 truncation_side: str = "right", model_input_names: list[str] | None = None,
                 clean_up_tokenization_spaces: bool = False, **kwargs: Any):
        _reject("__init__", kwargs)
        MistralTokenizer, ValidationMode, self._policy, self._request, Tekkenizer = _mistral_common()
        mode = getattr(mode, "value", mode)
        if mode not in [m.value for m in ValidationMode]:
            raise ValueError(f"mode={mode!r} is not valid; use one of {[m.value for m in ValidationMode]}")
        self._mode = ValidationMode(mode)
        self._tokenizer_path = Path(tokenizer_path)
        self.tokenizer = MistralTokenizer.from_file(str(self._tokenizer_path), mode=self._mode)
        self._raw = self.tokenizer.instruct_tokenizer.tokenizer
        self._is_tekken = isinstance(self._raw, Tekkenizer)
        self.model_max_length = model_max_length
        self.padding_side = padding_side
        self.truncation_side = truncation_side
        self.clean_up_tokenization_spaces = clean_up_tokenization_spaces
        if model_input_names is not None:
            self.model_input_names = list(model_input_names)
        self._special_ids = {i for i in range(self._raw.n_words) if self._raw.is_special(i)}
        self._vocab: dict[str, int] | None = None

    @property
    def mode(self):
        return self._mode

    # ----- vocabulary --------------------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        return self._raw.n_words

    def __len__(self) -> int:
        return self._raw.n_words

    # mistral-common's names for these tokens; their ids come from the vocabulary (a v1 file has no <pad>, so its
    # pad id is the unk id, as in transformers).
    bos_token, eos_token, unk_token, pad_token = "<s>", "</s>", "<unk>", "<pad>"

    @property
    def bos_token_id(self) -> int:
        return self.convert_tokens_to_ids(self.bos_token)

    @property
    def eos_token_id(self) -> int:
        return self.convert_tokens_to_ids(self.eos_token)

    @property
    def pad_token_id(self) -> int:
        return self.convert_tokens_to_ids(self.pad_token)

    @property
    def unk_token_id(self) -> int:
        return self.convert_tokens_to_ids(self.unk_token)

    @property
    def all_special_ids(self) -> list[int]:
        return sorted(self._special_ids)

    @property
    def all_special_tokens(self) -> list[str]:
        return self.convert_ids_to_tokens(self.all_special_ids)

    def get_vocab(self) -> dict[str, int]:
        """Token string -> id. Lossy for tekken: a byte token that is not valid UTF-8 shows as a string with "�",
        which maps to the token with exactly those bytes, else to <unk> (as transformers does)."""
        if self._vocab is None:
            pieces = self._raw.vocab()
            if self._is_tekken:
                keep = self._policy.KEEP
                by_bytes = {self._raw.id_to_byte_piece(i, keep): i for i in range(len(pieces)) if i not in self._special_ids}
                special = {pieces[i]: i for i in self._special_ids}
                vocab = {p: by_bytes.get(p.encode("utf-8"), special.get(p, self._raw.unk_id)) for p in pieces}
            else:
                vocab = {}
                for index, piece in enumerate(pieces):
                    vocab.setdefault(piece, index)
            self._vocab = dict(sorted(vocab.items(), key=lambda item: item[1]))
        return self._vocab

    def convert_ids_to_tokens(self, ids: int | Sequence[int], skip_special_tokens: bool = False) -> str | list[str]:
        single = isinstance(ids, (int, np.integer))
        ids = [int(ids)] if single else _to_id_list(ids)
        self._check_ids(ids)
        tokens = [self._raw.id_to_piece(i) for i in ids if not (skip_special_tokens and i in self._special_ids)]
        return tokens[0] if single else tokens

    def convert_tokens_to_ids(self, tokens: str | Sequence[str]) -> int | list[int]:
        if isinstance(tokens, str):
            return self.get_vocab().get(tokens, self._raw.unk_id)
        return [self.convert_tokens_to_ids(t) for t in tokens]

    def _check_ids(self, ids: list[int]) -> None:
        if ids and (min(ids) < 0 or max(ids) >= self._raw.n_words):
            bad = next(i for i in ids if not 0 <= i < self._raw.n_words)
            raise ValueError(f"Token id {bad} is outside the vocabulary of this tokenizer (ids 0..{self._raw.n_words - 1})")

    def add_tokens(self, *args: Any, **kwargs: Any):
        raise NotImplementedError("MistralCommonBackend cannot add tokens: mistral-common vocabularies are fixed")

    add_special_tokens = add_tokens

    # ----- encoding ----------------------------------------------------------------------------------------

    def _text_to_ids(self, text: str, add_special_tokens: bool) -> list[int]:
        finetuning = self._mode.value == "finetuning"
        return self._raw.encode(text, bos=add_special_tokens, eos=add_special_tokens and finetuning)

    def tokenize(self, text: str, **kwargs: Any) -> list[str]:
        _reject("tokenize", kwargs)
        return self.convert_ids_to_tokens(self._text_to_ids(text, add_special_tokens=False))

    def encode(self, text: str | list[int], text_pair: None = None, add_special_tokens: bool = True,
               padding: bool | str = False, truncation: bool | str | None = None, max_length: int | None = None,
               stride: int = 0, pad_to_multiple_of: int | None = None, padding_side: str | None = None,
               return_tensors: str | None = None, verbose: bool = True, **kwargs: Any) -> list[int] | torch.Tensor:
        _reject("encode", kwargs)
        return self(text, text_pair, add_special_tokens=add_special_tokens, padding=padding, truncation=truncation,
                    max_length=max_length, stride=stride, pad_to_multiple_of=pad_to_multiple_of,
                    padding_side=padding_side, return_tensors=return_tensors)["input_ids"]

    def get_special_tokens_mask(self, token_ids_0: list[int], token_ids_1: None = None,
                                already_has_special_tokens: bool = False) -> list[int]:
        if token_ids_1 is not None:
            raise ValueError("MistralCommonBackend does not support pairs: token_ids_1 must be None")
        if already_has_special_tokens:
            return [1 if int(i) in self._special_ids else 0 for i in token_ids_0]
        return [1] + [0] * len(token_ids_0) + ([1] if self._mode.value == "finetuning" else [])

    def truncate_sequences(self, ids: list[int], pair_ids: None = None, num_tokens_to_remove: int = 0,
                           truncation_strategy: str = "longest_first",
                           stride: int = 0) -> tuple[list[int], None, list[int]]:
        """Remove `num_tokens_to_remove` tokens on `truncation_side`; returns (ids, None, overflowing tokens), the
        overflow keeping `stride` tokens of context."""
        if pair_ids is not None:
            raise ValueError("MistralCommonBackend does not support pairs: pair_ids must be None")
        if _truncation_strategy(truncation_strategy) not in (None, "longest_first", "only_first"):
            raise ValueError(f"truncation_strategy={truncation_strategy!r} is not supported by MistralCommonBackend")
        if num_tokens_to_remove <= 0 or _truncation_strategy(truncation_strategy) is None:
            return ids, None, []
        window = min(len(ids), stride + num_tokens_to_remove)
        if self.truncation_side == "left":
            return ids[num_tokens_to_remove:], None, ids[:window]
        return ids[:-num_tokens_to_remove], None, ids[-window:]

    def prepare_for_model(self, ids: list[int], pair_ids: None = None, add_special_tokens: bool = True,
                          padding: bool | str = False, truncation: bool | str | None = None,
                          max_length: int | None = None, stride: int = 0, pad_to_multiple_of: int | None = None,
                          padding_side: str | None = None, return_tensors: str | None = None,
                          return_attention_mask: bool | None = None, return_overflowing_tokens: bool = False,
                          return_special_tokens_mask: bool = False, return_length: bool = False,
                          verbose: bool = True, prepend_batch_axis: bool = False, **kwargs: Any) -> BatchEncoding:
        """Add BOS (and EOS in finetuning mode), truncate and pad one sequence of ids."""
        if pair_ids is not None:
            raise ValueError("MistralCommonBackend does not support pairs: pair_ids must be None")
        _reject("prepare_for_model", kwargs)
        truncation = _truncation_strategy(truncation)
        if truncation is None and max_length is not None and _padding_strategy(padding) is None:
            truncation = "longest_first"
        if max_length is None and truncation:
            max_length = self.model_max_length
        n_special = (1 + (self._mode.value == "finetuning")) if add_special_tokens else 0
        data: dict[str, Any] = {}
        if truncation and max_length is not None and len(ids) + n_special > max_length:
            ids, _, overflow = self.truncate_sequences(ids, num_tokens_to_remove=len(ids) + n_special - max_length,
                                                       truncation_strategy=truncation, stride=stride)
            if return_overflowing_tokens:
                data["overflowing_tokens"] = overflow
                data["num_truncated_tokens"] = len(overflow) - stride
        if add_special_tokens:
            ids = [self._raw.bos_id] + ids + ([self._raw.eos_id] if self._mode.value == "finetuning" else [])
        data["input_ids"] = ids
        if return_special_tokens_mask:
            data["special_tokens_mask"] = [1 if i in self._special_ids else 0 for i in ids] if add_special_tokens \
                else [0] * len(ids)
        if return_length:
            data["length"] = len(ids)
        padded = pad_encodings(data, self.pad_token_id, padding_side or self.padding_side, padding, max_length,
                               pad_to_multiple_of, return_attention_mask)
        out = BatchEncoding(dict(padded))
        if prepend_batch_axis or return_tensors is not None:
            out = BatchEncoding({k: [v] if isinstance(v, list) else v for k, v in out.items()})
        return out.convert_to_tensors(return_tensors)

    def __call__(self, text: str | list[str] | list[int] | list[list[int]], text_pair: None = None,
                 add_special_tokens: bool = True, padding: bool | str = False, truncation: bool | str | None = None,
                 max_length: int | None = None, stride: int = 0, is_split_into_words: bool = False,
                 pad_to_multiple_of: int | None = None, padding_side: str | None = None,
                 return_tensors: str | None = None, return_attention_mask: bool | None = None,
                 return_overflowing_tokens: bool = False, return_special_tokens_mask: bool = False,
                 return_length: bool = False, verbose: bool = True, **kwargs: Any) -> BatchEncoding:
        """Tokenize a string or a list of strings (or pass ids through) into model inputs."""
        _reject("__call__", kwargs)
        if text_pair is not None:
            raise ValueError("MistralCommonBackend does not support pairs of sequences: text_pair must be None")
        if is_split_into_words:
            raise ValueError("MistralCommonBackend does not support is_split_into_words=True")
        batched = isinstance(text, (list, tuple)) and bool(text) and not isinstance(text[0], (int, np.integer))
        texts = list(text) if batched else [text]
        rows = []
        for item in texts:
            ids = self._text_to_ids(item, False) if isinstance(item, str) else _to_id_list(item)
            rows.append(self.prepare_for_model(
                ids, add_special_tokens=add_special_tokens, truncation=truncation,
                max_length=max_length, stride=stride, return_attention_mask=return_attention_mask,
                return_overflowing_tokens=return_overflowing_tokens, padding=False,
                pad_to_multiple_of=pad_to_multiple_of, padding_side=padding_side,
                return_special_tokens_mask=return_special_tokens_mask, return_length=return_length))
        merged = {key: [row[key] for row in rows] for key in rows[0]}
        out = self.pad(merged, padding=padding, max_length=max_length, pad_to_multiple_of=pad_to_multiple_of,
                       padding_side=padding_side, return_attention_mask=return_attention_mask)
        if not batched and return_tensors is None:
            out = BatchEncoding({key: value[0] for key, value in out.items()})
        return out.convert_to_tensors(return_tensors)

    def pad(self, encoded_inputs: Any, padding: bool | str = True, max_length: int | None = None,
            pad_to_multiple_of: int | None = None, padding_side: str | None = None,
            return_attention_mask: bool | None = None, return_tensors: str | None = None,
            verbose: bool = True) -> BatchEncoding:
        return pad_encodings(encoded_inputs, self.pad_token_id, padding_side or self.padding_side, padding,
                             max_length, pad_to_multiple_of, return_attention_mask, return_tensors,
                             self.model_max_length)

    # ----- decoding ----------------------------------------------------------------------------------------

    def decode(self, token_ids: Any, skip_special_tokens: bool = False,
               clean_up_tokenization_spaces: bool | None = None, **kwargs: Any) -> str | list[str]:
        _reject("decode", kwargs)
        ids = _to_id_list(token_ids)
        if ids and isinstance(ids[0], list):
            return self.batch_decode(ids, skip_special_tokens, clean_up_tokenization_spaces)
        self._check_ids(ids)
        policy = self._policy.IGNORE if skip_special_tokens else self._policy.KEEP
        text = self._raw.decode(ids, special_token_policy=policy)
        clean = self.clean_up_tokenization_spaces if clean_up_tokenization_spaces is None else clean_up_tokenization_spaces
        if clean:
            from .fast import CLEAN_UP

            for before, after in CLEAN_UP:
                text = text.replace(before, after)
        return text

    def batch_decode(self, sequences: Any, skip_special_tokens: bool = False,
                     clean_up_tokenization_spaces: bool | None = None, **kwargs: Any) -> list[str]:
        _reject("batch_decode", kwargs)
        return [self.decode(_to_id_list(s), skip_special_tokens, clean_up_tokenization_spaces)
                for s in _to_id_list(sequences)]

    # ----- chat --------------------------------------------------------------------------------------------

    def apply_chat_template(self, conversation: list[dict[str, Any]] | list[list[dict[str, Any]]],
                            tools: list[dict | Callable] | None = None, add_generation_prompt: bool = False,
                            continue_final_message: bool = False, tokenize: bool = True,
                            padding: bool | str = False, truncation: bool = False, max_length: int | None = None,
                            return_tensors: str | None = None, return_dict: bool = True,
                            **kwargs: Any) -> str | list[str] | list[int] | list[list[int]] | BatchEncoding:
        """Encode a conversation with mistral-common's own instruct format (there is no Jinja template)."""
        _reject("apply_chat_template", kwargs)
        if add_generation_prompt and continue_final_message:
            raise ValueError("Cannot use both add_generation_prompt and continue_final_message")
        if not conversation:
            raise ValueError("Cannot apply a chat template to an empty conversation: give at least one message")
        batched = isinstance(conversation[0], (list, tuple))
        conversations = conversation if batched else [conversation]
        if add_generation_prompt and any(c[-1].get("role") == "assistant" for c in conversations):
            raise ValueError("The last message is already an assistant message: use continue_final_message=True "
                             "instead of add_generation_prompt")
        from .chat_template import tool_schema

        schemas = None if tools is None else [tool_schema(t) for t in tools]
        outputs = []
        for messages in conversations:
            request = self._request.from_openai(messages=[dict(m) for m in messages], tools=schemas,
                                                continue_final_message=continue_final_message)
            tokens = self.tokenizer.encode_chat_completion(request).tokens
            outputs.append(tokens if tokenize else self._raw.decode(tokens, special_token_policy=self._policy.KEEP))
        outputs = outputs if batched else outputs[0]
        if not tokenize:
            return outputs
        out = self(outputs, padding=padding, truncation=truncation, max_length=max_length, add_special_tokens=False,
                   return_tensors=return_tensors)
        return out if return_dict else out["input_ids"]

    # ----- files -------------------------------------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, *init_inputs: Any,
                        mode: str = "test", cache_dir: str | None = None, force_download: bool = False,
                        local_files_only: bool = False, token: str | bool | None = None, revision: str = "main",
                        model_max_length: int = VERY_LARGE_INTEGER, padding_side: str = "left",
                        truncation_side: str = "right", model_input_names: list[str] | None = None,
                        clean_up_tokenization_spaces: bool = False, trust_remote_code: bool = False,
                        **kwargs: Any) -> "MistralCommonBackend":
        """Load from a folder (or hub repo) holding tekken.json or tokenizer.model.vN."""
        if init_inputs:
            raise ValueError("MistralCommonBackend.from_pretrained takes no extra positional arguments")
        if trust_remote_code:
            raise ValueError("trust_remote_code=True: maestrale never runs code from a checkpoint. Drop the option.")
        _reject("from_pretrained", kwargs)
        path = Path(pretrained_model_name_or_path)
        if path.is_dir():
            found = sorted(p.name for p in path.iterdir() if TOKENIZER_FILE.match(p.name))
            if not found:
                raise OSError(f"No mistral-common tokenizer file in {path}: looked for tekken.json and "
                              "tokenizer.model.v<N>; it holds " + str(sorted(p.name for p in path.iterdir())))
            tokenizer_path = path / ("tekken.json" if "tekken.json" in found else found[-1])
        else:
            from huggingface_hub import hf_hub_download, list_repo_files

            try:
                files = list_repo_files(str(pretrained_model_name_or_path), revision=revision, token=token)
                name = next(f for f in sorted(files, reverse=True) if TOKENIZER_FILE.match(f))
                tokenizer_path = hf_hub_download(str(pretrained_model_name_or_path), name, revision=revision,
                                                 cache_dir=cache_dir, force_download=force_download,
                                                 local_files_only=local_files_only, token=token)
            except Exception as error:
                raise OSError(f"Could not get a mistral-common tokenizer file for {pretrained_model_name_or_path!r}: "
                              f"not a local folder, and the hub failed ({type(error).__name__}: {error})") from error
        return cls(tokenizer_path, mode=mode, model_max_length=model_max_length, padding_side=padding_side,
                   truncation_side=truncation_side, model_input_names=model_input_names,
                   clean_up_tokenization_spaces=clean_up_tokenization_spaces)

    def save_pretrained(self, save_directory: str | os.PathLike, push_to_hub: bool = False,
                        **kwargs: Any) -> tuple[str, ...]:
        """Copy the tokenizer file into `save_directory`, so from_pretrained loads it back."""
        _reject("save_pretrained", kwargs)
        if push_to_hub:
            raise ValueError("push_to_hub is not supported by maestrale: save, then upload with huggingface_hub")
        os.makedirs(save_directory, exist_ok=True)
        target = Path(save_directory) / self._tokenizer_path.name
        if target.resolve() != self._tokenizer_path.resolve():
            shutil.copyfile(self._tokenizer_path, target)
        return (str(target),)

    def __repr__(self) -> str:
        return f"MistralCommonBackend(tokenizer_path={str(self._tokenizer_path)!r}, mode={self._mode.value!r})"
