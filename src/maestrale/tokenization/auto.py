"""AutoTokenizer.from_pretrained: find the tokenizer files of a folder or hub repo and build the fast tokenizer."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from .fast import VERY_LARGE_INTEGER, PreTrainedTokenizerFast

CONFIG_FILE = "tokenizer_config.json"
SPECIAL_TOKENS_FILE = "special_tokens_map.json"
TEMPLATE_FILE = "chat_template.jinja"
LEGACY_TEMPLATE_FILE = "chat_template.json"
MODEL_FILES = ("tokenizer.json", "tekken.json", "tokenizer.model")  # in order of preference
HUB_OPTIONS = ("cache_dir", "revision", "token", "local_files_only", "force_download", "subfolder")
# tokenizer_config.json keys that PreTrainedTokenizerFast takes as they are
PASSED_ON = ("add_bos_token", "add_eos_token", "padding_side", "truncation_side", "model_max_length",
             "clean_up_tokenization_spaces", "bos_token", "eos_token", "unk_token", "sep_token", "pad_token",
             "cls_token", "mask_token")
# transformers' Llama tokenizer class pads on the left unless told otherwise, and builds its own pipeline around the
# vocabulary and merges of a tokenizer.json (see sentencepiece.llama_tokenizer)
LLAMA_CLASSES = ("LlamaTokenizer", "LlamaTokenizerFast")


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not valid JSON ({error}); fix or remove the file") from None


def resolve_files(name_or_path: str | os.PathLike, wanted: tuple[str, ...], hub_options: dict[str, Any]) -> Path:
    """The local folder holding the tokenizer files: the folder itself, or a hub snapshot of just those files."""
    path = Path(name_or_path)
    subfolder = hub_options.get("subfolder") or ""
    if path.is_dir():
        return path / subfolder
    if path.exists():
        raise ValueError(f"{path} is a file; from_pretrained takes the folder that holds the tokenizer files")
    from huggingface_hub import snapshot_download

    patterns = [f"{subfolder}/{name}" if subfolder else name for name in wanted]
    options = {k: v for k, v in hub_options.items() if k != "subfolder" and v is not None}
    try:
        folder = snapshot_download(str(name_or_path), allow_patterns=patterns, **options)
    except Exception as error:  # offline, unknown repo, gated repo: the hub's own message says which
        raise OSError(
            f"Could not find {name_or_path!r}: it is not a local folder, and the hub download failed "
            f"({type(error).__name__}: {error})"
        ) from error
    return Path(folder) / subfolder


def load_tokenizer(name_or_path: str | os.PathLike, *args: Any, gguf_file: str | None = None,
                   trust_remote_code: bool = False, **kwargs: Any) -> PreTrainedTokenizerFast:
    """Build the tokenizer of a folder/hub repo: from tokenizer.json, tekken.json, tokenizer.model or a GGUF file,
    then apply tokenizer_config.json, special_tokens_map.json and chat_template.jinja; `kwargs` override the config."""
    if trust_remote_code:
        raise ValueError("trust_remote_code=True: maestrale never runs code from a checkpoint; its tokenizers are "
                         "built from the tokenizer files alone. Drop the option.")
    if args:
        raise TypeError(f"from_pretrained takes one positional argument (the folder or hub id); got extra {args}")
    hub_options = {k: kwargs.pop(k) for k in HUB_OPTIONS if k in kwargs}
    kwargs.pop("use_fast", None)  # always fast
    wanted = (CONFIG_FILE, SPECIAL_TOKENS_FILE, TEMPLATE_FILE, LEGACY_TEMPLATE_FILE, "tokenizer.json",
              "*tekken*.json", "tokenizer.model", *([gguf_file] if gguf_file else []))
    folder = resolve_files(name_or_path, wanted, hub_options)

    config = _read_json(folder / CONFIG_FILE) if (folder / CONFIG_FILE).is_file() else {}
    if (folder / SPECIAL_TOKENS_FILE).is_file():
        for key, value in _read_json(folder / SPECIAL_TOKENS_FILE).items():
            config.setdefault(key, value)
    if (folder / "tokenizer.json").is_file():  # as in transformers: its post-processor decides, not the config
        config.pop("add_bos_token", None)
        config.pop("add_eos_token", None)
    config.update(kwargs)

    if gguf_file is not None:
        tokenizer = _from_gguf(folder, gguf_file, str(name_or_path))
        _apply_overrides(tokenizer, kwargs)
        return tokenizer

    tokenizer_class = str(config.get("tokenizer_class", "PreTrainedTokenizerFast"))
    backend, defaults = _backend(folder, config, llama=tokenizer_class in LLAMA_CLASSES)
    init = {key: config[key] for key in PASSED_ON if key in config}
    for key, value in defaults.items():
        init.setdefault(key, value)
    if tokenizer_class in LLAMA_CLASSES:
        init.setdefault("padding_side", "left")
    if backend.padding is not None:
        init.setdefault("padding_side", backend.padding["direction"])
    if init.get("model_max_length") is None:
        init["model_max_length"] = VERY_LARGE_INTEGER

    # Added tokens listed in the config (e.g. Phi-3's <|user|> beyond the SentencePiece vocabulary) must sit at the
    # ids the config gives them.
    from .fast import as_added_token

    for index, token in sorted(((int(i), t) for i, t in config.get("added_tokens_decoder", {}).items())):
        added = as_added_token(token, special=bool(token.get("special", False)))
        if backend.token_to_id(added.content) is None:
            if index != backend.get_vocab_size(with_added_tokens=True):
                raise ValueError(
                    f"{folder / CONFIG_FILE}: added token {added.content!r} has id {index}, but the next free id is "
                    f"{backend.get_vocab_size(with_added_tokens=True)}; the config does not match the vocabulary"
                )
        (backend.add_special_tokens if added.special else backend.add_tokens)([added])

    extra = config.get("extra_special_tokens") or config.get("additional_special_tokens") or []
    if isinstance(extra, dict):  # transformers 5 also writes them as {name: token}
        extra = list(extra.values())
    return PreTrainedTokenizerFast(
        backend, **init, extra_special_tokens=extra, chat_template=_chat_template(folder, config),
        name_or_path=str(name_or_path), tokenizer_class=tokenizer_class,
    )


def _backend(folder: Path, config: dict[str, Any], llama: bool):
    """The `tokenizers.Tokenizer` from the first tokenizer file found, and the special tokens that file names.
    `llama`: the config names transformers' Llama tokenizer class, which rebuilds a tokenizer.json's pipeline."""
    from tokenizers import Tokenizer

    from .sentencepiece import tokenizer_from_sentencepiece

    legacy = config.get("legacy")
    add_prefix_space = config.get("add_prefix_space")
    add_prefix_space = True if add_prefix_space is None else bool(add_prefix_space)
    if (folder / "tokenizer.json").is_file():
        path = folder / "tokenizer.json"
        tokenizer = Tokenizer.from_file(str(path))
        if llama:
            tokenizer = _rebuilt_as_llama(path, tokenizer, bool(legacy), add_prefix_space,
                                          keep_added="added_tokens_decoder" not in config)
        return tokenizer, {}
    tekken = sorted(p for p in folder.glob("*tekken*.json") if p.is_file())
    if tekken:
        from .tekken import tokenizer_from_tekken

        return tokenizer_from_tekken(tekken[0])
    if (folder / "tokenizer.model").is_file():
        return tokenizer_from_sentencepiece(folder / "tokenizer.model", llama, None if legacy is None else bool(legacy),
                                            add_prefix_space)
    present = sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []
    raise OSError(
        f"No tokenizer file in {folder}: looked for {', '.join(MODEL_FILES)} (or *tekken*.json), and for a GGUF "
        f"pass gguf_file=. The folder holds: {present or 'nothing'}."
    )


def _rebuilt_as_llama(path: Path, loaded, legacy: bool, add_prefix_space: bool, keep_added: bool):
    """What transformers' LlamaTokenizer makes of a tokenizer.json: its vocabulary, merges, post-processor, padding
    and truncation in a new Llama pipeline; its added tokens only when the config lists none of its own."""
    from .sentencepiece import llama_tokenizer

    model = _read_json(path).get("model", {})
    if model.get("type") != "BPE":
        raise ValueError(f"{path}: tokenizer_class LlamaTokenizer needs a BPE model, but the file holds a "
                         f"{model.get('type')} model; set tokenizer_class to PreTrainedTokenizerFast in "
                         f"{CONFIG_FILE} to use the file as it is")
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model.get("merges", [])]
    tokenizer = llama_tokenizer(model["vocab"], merges, legacy, add_prefix_space)
    tokenizer.post_processor = loaded.post_processor
    if loaded.padding is not None:
        tokenizer.enable_padding(**loaded.padding)
    if loaded.truncation is not None:
        tokenizer.enable_truncation(**loaded.truncation)
    if keep_added:
        for _, token in sorted(loaded.get_added_tokens_decoder().items()):  # one by one: new ones get the next id
            (tokenizer.add_special_tokens if token.special else tokenizer.add_tokens)([token])
    return tokenizer


def _chat_template(folder: Path, config: dict[str, Any]) -> str | dict[str, str] | None:
    """chat_template.jinja wins over chat_template.json and tokenizer_config.json's chat_template."""
    if (folder / TEMPLATE_FILE).is_file():
        return (folder / TEMPLATE_FILE).read_text(encoding="utf-8")
    template = config.get("chat_template")
    if template is None and (folder / LEGACY_TEMPLATE_FILE).is_file():
        template = _read_json(folder / LEGACY_TEMPLATE_FILE).get("chat_template")
    if isinstance(template, list):  # named templates: [{"name": "default", "template": "..."}, ...]
        return {entry["name"]: entry["template"] for entry in template}
    return template


def _from_gguf(folder: Path, gguf_file: str, name_or_path: str) -> PreTrainedTokenizerFast:
    from ..loading.gguf_file import GGUFFile
    from .gguf import tokenizer_from_gguf

    path = folder / gguf_file
    if not path.is_file():
        raise OSError(f"GGUF file {gguf_file!r} not found in {folder}")
    fields = GGUFFile(path).fields
    metadata = {name: value for name, value in fields.items() if name.startswith("tokenizer.")}
    return tokenizer_from_gguf(metadata, fields.get("general.architecture"), name_or_path=name_or_path)


def _apply_overrides(tokenizer: PreTrainedTokenizerFast, overrides: dict[str, Any]) -> None:
    for key, value in overrides.items():
        if key not in PASSED_ON and key != "chat_template":
            raise TypeError(f"from_pretrained got an unknown option {key!r}")
        setattr(tokenizer, key, value)


class AutoTokenizer:
    """`AutoTokenizer.from_pretrained(folder_or_hub_id)` -> PreTrainedTokenizerFast."""

    def __init__(self):
        raise OSError("AutoTokenizer is built with AutoTokenizer.from_pretrained(folder_or_hub_id)")

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, *args: Any,
                        **kwargs: Any) -> PreTrainedTokenizerFast:
        return load_tokenizer(pretrained_model_name_or_path, *args, **kwargs)
