"""PreTrainedTokenizerFast: the transformers tokenizer API over a `tokenizers.Tokenizer`.

Encoding, truncation and padding all run in the Rust `tokenizers` library; this class only translates the
transformers arguments into its settings and its encodings into a BatchEncoding.
"""

from __future__ import annotations

import itertools
import json
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from tokenizers import AddedToken, Tokenizer, processors
from tokenizers.models import BPE

from .batch import BatchEncoding

VERY_LARGE_INTEGER = int(1e30)  # transformers' "no limit" for model_max_length
NAMED_SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
TRUNCATION_STRATEGIES = ("longest_first", "only_first", "only_second")
# The spaces that word-level tokenizers left before punctuation; `clean_up_tokenization_spaces` removes them.
CLEAN_UP = ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"), (" 'm", "'m"),
            (" 's", "'s"), (" 've", "'ve"), (" 're", "'re"))


def as_added_token(token: str | AddedToken | Mapping, special: bool) -> AddedToken:
    """An AddedToken from a string, an AddedToken, or its dict form in tokenizer_config.json."""
    if isinstance(token, AddedToken):
        return token
    if isinstance(token, Mapping):
        options = {k: token[k] for k in ("single_word", "lstrip", "rstrip", "normalized") if k in token}
        return AddedToken(token["content"], special=token.get("special", special), **options)
    return AddedToken(str(token), special=special, normalized=not special)


def _padding_strategy(padding: bool | str) -> str | None:
    padding = getattr(padding, "value", padding)
    if padding is True or padding == "longest":
        return "longest"
    if padding == "max_length":
        return "max_length"
    if padding in (False, None, "do_not_pad"):
        return None
    raise ValueError(f"padding={padding!r} is not valid: use True/'longest', 'max_length' or False/'do_not_pad'")


def _truncation_strategy(truncation: bool | str | None) -> str | None:
    truncation = getattr(truncation, "value", truncation)
    if truncation is True:
        return "longest_first"
    if truncation in (False, None, "do_not_truncate"):
        return None
    if truncation in TRUNCATION_STRATEGIES:
        return truncation
    raise ValueError(f"truncation={truncation!r} is not valid: use True, {', '.join(TRUNCATION_STRATEGIES)} or False")


def _nested_lists(value: Any) -> Any:
    """A tensor, array or list of ids (or of id sequences) as plain Python lists; numbers pass through."""
    if isinstance(value, (torch.Tensor, np.ndarray)):
        return value.tolist()
    if not isinstance(value, (list, tuple)):
        return value
    return [v.tolist() if isinstance(v, (torch.Tensor, np.ndarray)) else v for v in value]


def _to_id_list(token_ids: Any) -> list:
    if isinstance(token_ids, (torch.Tensor, np.ndarray)):
        return token_ids.tolist()
    if isinstance(token_ids, (int, np.integer)):
        return [int(token_ids)]
    return list(token_ids)


class PreTrainedTokenizerFast:
    """A fast tokenizer with the public API of transformers' `PreTrainedTokenizerFast`."""

    model_input_names = ["input_ids", "attention_mask"]

    def __init__(
        self,
        tokenizer_object: Tokenizer | None = None,
        *,
        tokenizer_file: str | None = None,
        bos_token: str | AddedToken | None = None,
        eos_token: str | AddedToken | None = None,
        unk_token: str | AddedToken | None = None,
        sep_token: str | AddedToken | None = None,
        pad_token: str | AddedToken | None = None,
        cls_token: str | AddedToken | None = None,
        mask_token: str | AddedToken | None = None,
        extra_special_tokens: Sequence[str | AddedToken] | None = None,
        add_bos_token: bool | None = None,
        add_eos_token: bool | None = None,
        padding_side: str = "right",
        truncation_side: str = "right",
        model_max_length: int = VERY_LARGE_INTEGER,
        chat_template: str | dict[str, str] | None = None,
        clean_up_tokenization_spaces: bool = False,
        name_or_path: str = "",
        tokenizer_class: str = "PreTrainedTokenizerFast",
    ):
        if tokenizer_object is None:
            if tokenizer_file is None:
                raise ValueError("PreTrainedTokenizerFast needs tokenizer_object= (a tokenizers.Tokenizer) or tokenizer_file=")
            tokenizer_object = Tokenizer.from_file(tokenizer_file)
        self._tokenizer = tokenizer_object
        self.name_or_path = name_or_path
        self.tokenizer_class = tokenizer_class
        self.padding_side = padding_side
        self.truncation_side = truncation_side
        self.model_max_length = model_max_length
        self.chat_template = chat_template
        self.clean_up_tokenization_spaces = clean_up_tokenization_spaces

        named = dict(bos_token=bos_token, eos_token=eos_token, unk_token=unk_token, sep_token=sep_token,
                     pad_token=pad_token, cls_token=cls_token, mask_token=mask_token)
        self._special: dict[str, str | None] = {
            name: None if t is None else as_added_token(t, special=True).content for name, t in named.items()}
        self._extra_special: list[str] = []
        specials = [as_added_token(t, special=True) for t in named.values() if t is not None]
        for token in extra_special_tokens or ():
            added = as_added_token(token, special=True)
            specials.append(added)
            if added.content not in self._extra_special:
                self._extra_special.append(added.content)
        # As in transformers, a token that is already an added token keeps its flags (a non-special added token named
        # as an extra special token stays non-special); one of the vocabulary keeps its id and becomes special.
        added = {t.content for t in self._tokenizer.get_added_tokens_decoder().values()}
        self._tokenizer.add_special_tokens([t for t in specials if t.content not in added])

        # As in transformers: an explicit add_bos_token/add_eos_token (or no post-processor at all) means the
        # post-processor is rebuilt from them; otherwise the one in tokenizer.json decides.
        self._add_bos_token = bool(add_bos_token)
        self._add_eos_token = bool(add_eos_token)
        if add_bos_token is not None or add_eos_token is not None or self._tokenizer.post_processor is None:
            self._update_post_processor()

    # ----- special tokens -----------------------------------------------------------------------------------

    def __getattr__(self, name: str) -> Any:
        # bos_token, eos_token, ... and their *_id twins, kept in one dict rather than fourteen properties.
        special = self.__dict__.get("_special")
        if special is not None:
            if name in special:
                return special[name]
            if name.endswith("_id") and name[:-3] in special:
                token = special[name[:-3]]
                return None if token is None else self.convert_tokens_to_ids(token)
        raise AttributeError(f"{type(self).__name__} has no attribute {name!r}")

    def __setattr__(self, name: str, value: Any) -> None:
        if name in NAMED_SPECIAL_TOKENS:
            self._special[name] = None if value is None else str(getattr(value, "content", value))
        elif name.endswith("_id") and name[:-3] in NAMED_SPECIAL_TOKENS:
            self._special[name[:-3]] = None if value is None else self.convert_ids_to_tokens(value)
        else:
            super().__setattr__(name, value)

    @property
    def extra_special_tokens(self) -> list[str]:
        return list(self._extra_special)

    additional_special_tokens = extra_special_tokens

    @property
    def special_tokens_map(self) -> dict[str, Any]:
        """The named special tokens that are set, plus `additional_special_tokens` (chat templates read these)."""
        out: dict[str, Any] = {name: token for name, token in self._special.items() if token is not None}
        if self._extra_special:
            out["additional_special_tokens"] = list(self._extra_special)
        return out

    @property
    def all_special_tokens(self) -> list[str]:
        tokens = [t for t in self._special.values() if t is not None] + self._extra_special
        return list(dict.fromkeys(tokens))

    @property
    def all_special_ids(self) -> list[int]:
        return [i for i in (self.convert_tokens_to_ids(t) for t in self.all_special_tokens) if i is not None]

    @property
    def add_bos_token(self) -> bool:
        return self._add_bos_token

    @add_bos_token.setter
    def add_bos_token(self, value: bool) -> None:
        self._add_bos_token = bool(value)
        self._update_post_processor()

    @property
    def add_eos_token(self) -> bool:
        return self._add_eos_token

    @add_eos_token.setter
    def add_eos_token(self, value: bool) -> None:
        self._add_eos_token = bool(value)
        self._update_post_processor()

    def _update_post_processor(self) -> None:
        """BOS/EOS around each sequence, as `add_bos_token`/`add_eos_token` say."""
        bos, eos = self._special["bos_token"], self._special["eos_token"]
        if bos is None or self.convert_tokens_to_ids(bos) is None:
            self._add_bos_token = False
        if eos is None or self.convert_tokens_to_ids(eos) is None:
            self._add_eos_token = False
        first = ([f"{bos}:0"] if self._add_bos_token else []) + ["$A:0"] + ([f"{eos}:0"] if self._add_eos_token else [])
        second = ([f"{bos}:1"] if self._add_bos_token else []) + ["$B:1"] + ([f"{eos}:1"] if self._add_eos_token else [])
        ids = ([(bos, self.convert_tokens_to_ids(bos))] if self._add_bos_token else []) + (
            [(eos, self.convert_tokens_to_ids(eos))] if self._add_eos_token else [])
        self._tokenizer.post_processor = processors.TemplateProcessing(
            single=" ".join(first), pair=" ".join(first + second), special_tokens=ids
        )

    def add_special_tokens(self, special_tokens_dict: Mapping[str, Any], replace_extra_special_tokens: bool = True) -> int:
        """Set named special tokens (bos_token, pad_token, ...) and/or `additional_special_tokens`; returns how many
        tokens were new to the vocabulary."""
        to_add: list[AddedToken] = []
        for key, value in special_tokens_dict.items():
            if key in NAMED_SPECIAL_TOKENS:
                token = as_added_token(value, special=True)
                self._special[key] = token.content
                to_add.append(token)
            elif key in ("additional_special_tokens", "extra_special_tokens"):
                tokens = [as_added_token(t, special=True) for t in value]
                contents = [t.content for t in tokens]
                if replace_extra_special_tokens:
                    self._extra_special = contents
                else:
                    self._extra_special += [c for c in contents if c not in self._extra_special]
                to_add += tokens
            else:
                raise ValueError(
                    f"add_special_tokens got the key {key!r}; use one of {list(NAMED_SPECIAL_TOKENS)} "
                    "or 'additional_special_tokens'"
                )
        added = self._tokenizer.add_special_tokens(to_add)
        if self._add_bos_token or self._add_eos_token:
            self._update_post_processor()  # the bos/eos strings may have changed
        return added

    def add_tokens(self, new_tokens: str | AddedToken | Sequence[str | AddedToken], special_tokens: bool = False) -> int:
        """Add tokens to the vocabulary (special ones are never split and can be skipped in decode); returns how
        many were new."""
        if isinstance(new_tokens, (str, AddedToken)):
            new_tokens = [new_tokens]
        tokens = [as_added_token(t, special=special_tokens) for t in new_tokens]
        if special_tokens:
            self._extra_special += [t.content for t in tokens if t.content not in self._extra_special]
            return self._tokenizer.add_special_tokens(tokens)
        return self._tokenizer.add_tokens(tokens)

    # ----- vocabulary --------------------------------------------------------------------------------------

    @property
    def backend_tokenizer(self) -> Tokenizer:
        return self._tokenizer

    @property
    def vocab_size(self) -> int:
        """Size of the base vocabulary, without added tokens."""
        return self._tokenizer.get_vocab_size(with_added_tokens=False)

    def __len__(self) -> int:
        return self._tokenizer.get_vocab_size(with_added_tokens=True)

    def get_vocab(self) -> dict[str, int]:
        return self._tokenizer.get_vocab(with_added_tokens=True)

    def get_added_vocab(self) -> dict[str, int]:
        return {token.content: index for index, token in sorted(self.added_tokens_decoder.items())}

    @property
    def added_tokens_decoder(self) -> dict[int, AddedToken]:
        return dict(self._tokenizer.get_added_tokens_decoder())

    def convert_tokens_to_ids(self, tokens: str | Sequence[str]) -> int | None | list[int | None]:
        """Token string(s) to id(s); unknown tokens map to the unk id (None without an unk token)."""
        if isinstance(tokens, str):
            index = self._tokenizer.token_to_id(tokens)
            if index is None and self._special["unk_token"] is not None and tokens != self._special["unk_token"]:
                return self._tokenizer.token_to_id(self._special["unk_token"])
            return index
        return [self.convert_tokens_to_ids(t) for t in tokens]

    def convert_ids_to_tokens(self, ids: int | Sequence[int], skip_special_tokens: bool = False) -> str | list[str]:
        if isinstance(ids, (int, np.integer)):
            self._check_ids([int(ids)])
            return self._tokenizer.id_to_token(int(ids))
        ids = _to_id_list(ids)
        self._check_ids(ids)
        skip = set(self.all_special_ids) if skip_special_tokens else ()
        return [self._tokenizer.id_to_token(i) for i in ids if i not in skip]

    def convert_tokens_to_string(self, tokens: Sequence[str]) -> str:
        return self._tokenizer.decoder.decode(list(tokens)) if self._tokenizer.decoder else " ".join(tokens)

    def _check_ids(self, ids: list) -> None:
        # The base vocabulary's size is cheap to ask; the whole one's is not (tokenizers counts the added tokens).
        if not ids or (min(ids) >= 0 and max(ids) < self.vocab_size):
            return
        size = len(self)
        if min(ids) < 0 or max(ids) >= size:
            bad = next(i for i in ids if not 0 <= i < size)
            raise ValueError(f"Token id {bad} is outside the vocabulary of this tokenizer (ids 0..{size - 1})")

    # ----- encoding ----------------------------------------------------------------------------------------

    def __call__(
        self,
        text: str | Sequence[str] | Sequence[Sequence[str]] | None = None,
        text_pair: str | Sequence[str] | None = None,
        add_special_tokens: bool = True,
        padding: bool | str = False,
        truncation: bool | str | None = None,
        max_length: int | None = None,
        stride: int = 0,
        is_split_into_words: bool = False,
        pad_to_multiple_of: int | None = None,
        padding_side: str | None = None,
        return_tensors: str | None = None,
        return_token_type_ids: bool | None = None,
        return_attention_mask: bool | None = None,
        return_overflowing_tokens: bool = False,
        return_special_tokens_mask: bool = False,
        return_offsets_mapping: bool = False,
        return_length: bool = False,
        verbose: bool = True,
        text_target: str | Sequence[str] | None = None,
        text_pair_target: str | Sequence[str] | None = None,
    ) -> BatchEncoding:
        """Tokenize a string, a list of strings, or pairs of them, into model inputs; `text_target` is encoded the
        same way into `labels` (or returned alone when there is no `text`)."""
        if text_target is not None:
            options = {k: v for k, v in locals().items()
                       if k not in ("self", "text", "text_pair", "text_target", "text_pair_target")}
            targets = self(text_target, text_pair_target, **options)
            if text is None:
                return targets
            encodings = self(text, text_pair, **options)
            encodings["labels"] = targets["input_ids"]
            return encodings
        if text is None:
            raise ValueError("The tokenizer needs text (or text_target): a string, a list of strings, or (with "
                             "text_pair) pairs")
        batched = (isinstance(text, (list, tuple)) and not is_split_into_words) or (
            is_split_into_words and isinstance(text, (list, tuple)) and text and isinstance(text[0], (list, tuple)))
        if batched:
            inputs = list(zip(text, text_pair)) if text_pair is not None else list(text)
            if text_pair is not None and len(text) != len(text_pair):
                raise ValueError(f"text has {len(text)} entries and text_pair {len(text_pair)}: they must match")
        else:
            inputs = [(text, text_pair) if text_pair is not None else text]
        for item in inputs:
            if not isinstance(item, (str, tuple, list)):
                raise TypeError(f"Text input must be str (or a list/tuple of them); got {type(item).__name__}")

        padding_strategy = _padding_strategy(padding)
        truncation_strategy = _truncation_strategy(truncation)
        if truncation is None and max_length is not None and padding_strategy is None:
            truncation_strategy = "longest_first"  # transformers truncates when only max_length is given
        self._set_truncation_and_padding(padding_strategy, truncation_strategy, max_length, stride,
                                         pad_to_multiple_of, padding_side or self.padding_side)
        # Without offsets asked for, the cheaper encode_batch_fast skips computing them; the BatchEncoding then
        # has no character alignment (char_to_token) to offer.
        aligned = return_offsets_mapping or not hasattr(self._tokenizer, "encode_batch_fast")
        encode = self._tokenizer.encode_batch if aligned else self._tokenizer.encode_batch_fast
        encodings = encode(inputs, add_special_tokens=add_special_tokens, is_pretokenized=is_split_into_words)
        if return_overflowing_tokens:
            sample = [i for i, e in enumerate(encodings) for _ in range(1 + len(e.overflowing))]
            encodings = [x for e in encodings for x in (e, *e.overflowing)]

        data: dict[str, Any] = {"input_ids": [e.ids for e in encodings]}
        if return_token_type_ids:
            data["token_type_ids"] = [e.type_ids for e in encodings]
        if return_attention_mask is None or return_attention_mask:
            data["attention_mask"] = [e.attention_mask for e in encodings]
        if return_special_tokens_mask:
            data["special_tokens_mask"] = [e.special_tokens_mask for e in encodings]
        if return_offsets_mapping:
            data["offset_mapping"] = [e.offsets for e in encodings]
        if return_length:
            data["length"] = [len(e.ids) for e in encodings]
        if return_overflowing_tokens:
            data["overflow_to_sample_mapping"] = sample
        elif not batched and return_tensors is None:
            data = {key: value[0] for key, value in data.items()}  # one text in, one sequence out
        return BatchEncoding(data, encodings if aligned else None, tensor_type=return_tensors)

    def _set_truncation_and_padding(self, padding: str | None, truncation: str | None, max_length: int | None,
                                    stride: int, pad_to_multiple_of: int | None, padding_side: str) -> None:
        if max_length is None and (truncation or padding == "max_length"):
            max_length = self.model_max_length if self.model_max_length < VERY_LARGE_INTEGER else None
            if max_length is None:  # no limit known: nothing to truncate or pad to
                truncation = None
                padding = None if padding == "max_length" else padding
        if truncation:
            self._tokenizer.enable_truncation(max_length, stride=stride, strategy=truncation,
                                              direction=self.truncation_side)
        else:
            self._tokenizer.no_truncation()
        if padding:
            pad_token = self._special["pad_token"]
            pad_id = None if pad_token is None else self.convert_tokens_to_ids(pad_token)
            if pad_id is None:
                raise ValueError(
                    "Asking to pad but the tokenizer has no pad token. Set one, e.g. `tokenizer.pad_token = "
                    "tokenizer.eos_token`, or add one with `tokenizer.add_special_tokens({'pad_token': '[PAD]'})`."
                )
            if padding_side not in ("left", "right"):
                raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
            self._tokenizer.enable_padding(direction=padding_side, pad_id=pad_id, pad_token=pad_token,
                                           length=max_length if padding == "max_length" else None,
                                           pad_to_multiple_of=pad_to_multiple_of)
        else:
            self._tokenizer.no_padding()

    def encode(
        self,
        text: str,
        text_pair: str | None = None,
        add_special_tokens: bool = True,
        padding: bool | str = False,
        truncation: bool | str | None = None,
        max_length: int | None = None,
        stride: int = 0,
        padding_side: str | None = None,
        return_tensors: str | None = None,
        **kwargs: Any,
    ) -> list[int] | torch.Tensor | np.ndarray:
        """The token ids of one text (or pair)."""
        return self(text, text_pair, add_special_tokens=add_special_tokens, padding=padding, truncation=truncation,
                    max_length=max_length, stride=stride, padding_side=padding_side, return_tensors=return_tensors,
                    **kwargs)["input_ids"]

    def tokenize(self, text: str, pair: str | None = None, add_special_tokens: bool = False) -> list[str]:
        """The token strings of a text, without special tokens unless asked."""
        self._tokenizer.no_truncation()
        self._tokenizer.no_padding()
        return self._tokenizer.encode(text, pair, add_special_tokens=add_special_tokens).tokens

    def num_special_tokens_to_add(self, pair: bool = False) -> int:
        return self._tokenizer.num_special_tokens_to_add(pair)

    def pad(
        self,
        encoded_inputs: Mapping[str, Any] | Sequence[Mapping[str, Any]],
        padding: bool | str = True,
        max_length: int | None = None,
        pad_to_multiple_of: int | None = None,
        padding_side: str | None = None,
        return_attention_mask: bool | None = None,
        return_tensors: str | None = None,
        verbose: bool = True,
    ) -> BatchEncoding:
        """Pad already tokenized inputs (one, a batch, or a list of them) to a common length."""
        return pad_encodings(encoded_inputs, self.pad_token_id, self.padding_side if padding_side is None else padding_side,
                             padding, max_length, pad_to_multiple_of, return_attention_mask, return_tensors,
                             self.model_max_length)

    # ----- decoding ----------------------------------------------------------------------------------------

    def decode(self, token_ids: Any, skip_special_tokens: bool = False,
               clean_up_tokenization_spaces: bool | None = None, **kwargs: Any) -> str | list[str]:
        """Token ids back to text (a batch of sequences gives a list of texts)."""
        ids = _to_id_list(token_ids)
        if ids and isinstance(ids[0], (list, tuple, torch.Tensor, np.ndarray)):
            return self.batch_decode(ids, skip_special_tokens, clean_up_tokenization_spaces, **kwargs)
        if kwargs:
            raise TypeError(f"decode() got unexpected keyword arguments {sorted(kwargs)}")
        self._check_ids(ids)
        return self._clean_up(self._tokenizer.decode(ids, skip_special_tokens=skip_special_tokens),
                              clean_up_tokenization_spaces)

    def batch_decode(self, sequences: Any, skip_special_tokens: bool = False,
                     clean_up_tokenization_spaces: bool | None = None, **kwargs: Any) -> list[str]:
        """decode() of each sequence, in one call of the backend (the server detokenises a step's rows at once)."""
        if kwargs:
            raise TypeError(f"batch_decode() got unexpected keyword arguments {sorted(kwargs)}")
        if isinstance(sequences, (torch.Tensor, np.ndarray)):
            sequences = sequences.tolist()
        rows = [s if type(s) is list else _to_id_list(s) for s in sequences]
        self._check_ids(list(itertools.chain.from_iterable(rows)))
        return [self._clean_up(text, clean_up_tokenization_spaces)
                for text in self._tokenizer.decode_batch(rows, skip_special_tokens=skip_special_tokens)]

    def _clean_up(self, text: str, clean_up_tokenization_spaces: bool | None) -> str:
        clean = self.clean_up_tokenization_spaces if clean_up_tokenization_spaces is None else clean_up_tokenization_spaces
        # As transformers 5 does, BPE output is never cleaned up: the clean-up is meant for WordPiece and would
        # delete real spaces before punctuation.
        if clean and not isinstance(self._tokenizer.model, BPE):
            for before, after in CLEAN_UP:
                text = text.replace(before, after)
        return text

    # ----- chat templates ----------------------------------------------------------------------------------

    def get_chat_template(self, chat_template: str | None = None, tools: list | None = None) -> str:
        """The template to render: `chat_template` given as text or as a name, else the tokenizer's own."""
        from .chat_template import select_template

        return select_template(self.chat_template, chat_template, tools)

    def apply_chat_template(
        self,
        conversation: list[dict[str, Any]] | list[list[dict[str, Any]]],
        tools: list[dict | Callable] | None = None,
        documents: list[dict[str, str]] | None = None,
        chat_template: str | None = None,
        add_generation_prompt: bool = False,
        continue_final_message: bool = False,
        tokenize: bool = True,
        padding: bool | str = False,
        truncation: bool = False,
        max_length: int | None = None,
        return_tensors: str | None = None,
        return_dict: bool = True,
        return_assistant_tokens_mask: bool = False,
        tokenizer_kwargs: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> str | list[str] | list[int] | list[list[int]] | BatchEncoding:
        """Render a conversation (or a batch of them) with the chat template; tokenized into a BatchEncoding by
        default, as in transformers 5. `return_assistant_tokens_mask` adds `assistant_masks`: 1 for each token of
        the text the template wraps in {% generation %} blocks."""
        from .chat_template import render_conversations

        if return_assistant_tokens_mask and not (tokenize and return_dict):
            raise ValueError("return_assistant_tokens_mask=True needs tokenize=True and return_dict=True: the mask "
                             "is returned beside input_ids in the BatchEncoding")
        template = self.get_chat_template(chat_template, tools)
        batched = bool(conversation) and isinstance(conversation[0], (list, tuple))
        spans = [] if return_assistant_tokens_mask else None
        rendered = render_conversations(
            template, conversation if batched else [conversation], tools=tools, documents=documents,
            add_generation_prompt=add_generation_prompt, continue_final_message=continue_final_message,
            template_kwargs={**self.special_tokens_map, **kwargs}, generation_spans=spans,
        )
        rendered = rendered if batched else rendered[0]
        if not tokenize:
            return rendered
        options = dict(tokenizer_kwargs or {})
        offsets_asked = options.pop("return_offsets_mapping", False)
        out = self(rendered, padding=padding, truncation=truncation, max_length=max_length, add_special_tokens=False,
                   return_tensors=return_tensors, return_offsets_mapping=offsets_asked or spans is not None, **options)
        if spans is not None:
            if not offsets_asked:
                del out["offset_mapping"]
            masks = [_span_mask(encoding.offsets, row) for encoding, row in zip(out.encodings, spans)]
            out["assistant_masks"] = masks if batched or return_tensors else masks[0]
            if return_tensors:
                out.convert_to_tensors(return_tensors)
        return out if return_dict else out["input_ids"]

    # ----- files -------------------------------------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, *args: Any, **kwargs: Any):
        """Load from a folder or hub id: tokenizer.json, a SentencePiece tokenizer.model, tekken.json or a GGUF
        file (`gguf_file=`), with tokenizer_config.json and special_tokens_map.json applied."""
        from .auto import load_tokenizer

        return load_tokenizer(pretrained_model_name_or_path, *args, **kwargs)

    def save_pretrained(self, save_directory: str | os.PathLike, filename_prefix: str | None = None,
                        **kwargs: Any) -> tuple[str, ...]:
        """Write tokenizer.json, tokenizer_config.json (and chat_template.jinja) so that from_pretrained, here or
        in transformers, loads the same tokenizer."""
        if kwargs.get("push_to_hub"):
            raise ValueError("push_to_hub is not supported by maestrale: save, then upload with huggingface_hub")
        if os.path.isfile(save_directory):
            raise ValueError(f"save_pretrained needs a folder, but {save_directory} is a file")
        os.makedirs(save_directory, exist_ok=True)
        prefix = f"{filename_prefix}-" if filename_prefix else ""
        tokenizer_file = os.path.join(save_directory, prefix + "tokenizer.json")
        config_file = os.path.join(save_directory, prefix + "tokenizer_config.json")
        self._tokenizer.no_truncation()
        self._tokenizer.no_padding()
        self._tokenizer.save(tokenizer_file)

        config: dict[str, Any] = {
            "added_tokens_decoder": {
                str(index): {"content": t.content, "lstrip": t.lstrip, "normalized": t.normalized, "rstrip": t.rstrip,
                             "single_word": t.single_word, "special": t.special}
                for index, t in sorted(self.added_tokens_decoder.items())
            },
            **{name: token for name, token in self._special.items() if token is not None},
            "add_bos_token": self._add_bos_token,
            "add_eos_token": self._add_eos_token,
            "clean_up_tokenization_spaces": self.clean_up_tokenization_spaces,
            "extra_special_tokens": list(self._extra_special),
            "model_max_length": self.model_max_length,
            "padding_side": self.padding_side,
            "truncation_side": self.truncation_side,
            "tokenizer_class": self.tokenizer_class,
        }
        files = [config_file, tokenizer_file]
        if isinstance(self.chat_template, str):
            template_file = os.path.join(save_directory, prefix + "chat_template.jinja")
            with open(template_file, "w", encoding="utf-8") as f:
                f.write(self.chat_template)
            files.append(template_file)
        elif isinstance(self.chat_template, dict):
            config["chat_template"] = [{"name": k, "template": v} for k, v in self.chat_template.items()]
        with open(config_file, "w", encoding="utf-8") as f:
            json.dump(config, f, indent=2, ensure_ascii=False)
        return tuple(files)

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(name_or_path={self.name_or_path!r}, vocab_size={self.vocab_size}, "
                f"model_max_length={self.model_max_length}, padding_side={self.padding_side!r}, "
                f"special_tokens={self.special_tokens_map})")


def _span_mask(offsets: list[tuple[int, int]], spans: list[tuple[int, int]]) -> list[int]:
    """1 for each token whose characters overlap one of `spans` (so a span cut by truncation keeps the rest)."""
    return [int(any(start < stop and end > first for first, stop in spans)) for start, end in offsets]


def pad_encodings(encoded_inputs: Any, pad_token_id: int | None, padding_side: str, padding: bool | str = True,
                  max_length: int | None = None, pad_to_multiple_of: int | None = None,
                  return_attention_mask: bool | None = None, return_tensors: str | None = None,
                  model_max_length: int = VERY_LARGE_INTEGER) -> BatchEncoding:
    """Pad tokenized inputs (a dict of one or many sequences, or a list of dicts) on `padding_side`."""
    if isinstance(encoded_inputs, (list, tuple)) and encoded_inputs and isinstance(encoded_inputs[0], Mapping):
        encoded_inputs = {key: [item[key] for item in encoded_inputs] for key in encoded_inputs[0]}
    if "input_ids" not in encoded_inputs:
        raise ValueError(f"pad() needs 'input_ids' among its inputs; got {list(encoded_inputs)}")
    if return_tensors is None:  # keep the kind of tensor that came in
        first = encoded_inputs["input_ids"]
        first = first[0] if isinstance(first, (list, tuple)) and first else first
        return_tensors = "pt" if isinstance(first, torch.Tensor) else "np" if isinstance(first, np.ndarray) else None
    data = {key: _nested_lists(value) for key, value in encoded_inputs.items()}
    single = not data["input_ids"] or not isinstance(data["input_ids"][0], list)
    if single:
        data = {key: [value] for key, value in data.items()}
    if return_attention_mask is None or return_attention_mask:
        data.setdefault("attention_mask", [[1] * len(ids) for ids in data["input_ids"]])
    else:
        data.pop("attention_mask", None)

    strategy = _padding_strategy(padding)
    lengths = [len(ids) for ids in data["input_ids"]]
    if strategy == "longest":
        target = max(lengths, default=0)
    elif strategy == "max_length":
        target = max_length if max_length is not None else model_max_length
    else:
        target = None
    if target is not None and pad_to_multiple_of and target % pad_to_multiple_of:
        target = (target // pad_to_multiple_of + 1) * pad_to_multiple_of
    if target is not None and any(n < target for n in lengths):
        if pad_token_id is None:
            raise ValueError("Asking to pad but the tokenizer has no pad token. Set one, e.g. "
                             "`tokenizer.pad_token = tokenizer.eos_token`.")
        fills = {"input_ids": pad_token_id, "attention_mask": 0, "token_type_ids": 0, "special_tokens_mask": 1}
        for key, rows in data.items():
            if key not in fills:
                continue
            for i, row in enumerate(rows):
                gap = [fills[key]] * (target - len(row))
                rows[i] = gap + row if padding_side == "left" else row + gap
    if single:
        data = {key: value[0] for key, value in data.items()}
    return BatchEncoding(data, tensor_type=return_tensors)
