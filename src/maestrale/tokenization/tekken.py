"""Mistral's tekken.json (tiktoken-style byte-level BPE) -> `tokenizers.Tokenizer`.

The file lists tokens by rank as base64 bytes; special tokens take the first ids. Like tiktoken, a pre-token that
is a whole vocabulary entry is taken as it is (`ignore_merges`); otherwise merges, recovered from the ranks, apply.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

from tokenizers import AddedToken, Regex, Tokenizer, decoders, pre_tokenizers, processors
from tokenizers.models import BPE

from .byte_level import spell

# tekken.json files written before special tokens were stored in them (e.g. tekken_240718/240911) use these, the
# defaults of mistral-common, then "<SPECIAL_{id}>" up to the file's default_num_special_tokens.
LEGACY_SPECIAL_TOKENS = (
    "<unk>", "<s>", "</s>", "[INST]", "[/INST]", "[AVAILABLE_TOOLS]", "[/AVAILABLE_TOOLS]", "[TOOL_RESULTS]",
    "[/TOOL_RESULTS]", "[TOOL_CALLS]", "[IMG]", "<pad>", "[IMG_BREAK]", "[IMG_END]", "[PREFIX]", "[MIDDLE]",
    "[SUFFIX]", "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]", "[TOOL_CONTENT]",
)


def is_tekken_file(path: str | Path) -> bool:
    name = Path(path).name
    return "tekken" in name and name.endswith(".json")


def special_tokens(raw: dict[str, Any]) -> list[str]:
    """Special token strings in id order."""
    config = raw["config"]
    entries = raw.get("special_tokens")
    if entries is None:
        named = list(LEGACY_SPECIAL_TOKENS)
    else:
        named = [str(e["token_str"]) for e in sorted(entries, key=lambda e: e["rank"])]
    count = config.get("default_num_special_tokens", len(named))
    return named + [f"<SPECIAL_{i}>" for i in range(len(named), count)]


def tokenizer_from_tekken(path: str | Path) -> tuple[Tokenizer, dict[str, str]]:
    """A `tokenizers.Tokenizer` that encodes like mistral-common's Tekkenizer, and its unk/bos/eos/pad strings."""
    raw = json.loads(Path(path).read_text(encoding="utf-8"))
    try:
        config = raw["config"]
        specials = special_tokens(raw)
        entries = raw["vocab"]
        if config.get("default_vocab_size") is not None:  # the file may hold more tokens than the model uses
            entries = entries[: config["default_vocab_size"] - len(specials)]
        ranks = {base64.b64decode(e["token_bytes"]): rank for rank, e in enumerate(entries)}
    except (KeyError, TypeError) as error:
        raise ValueError(f"{path} is not a tekken.json tokenizer file (missing {error})") from None

    # Merges: every split of a token into two tokens, ordered by the merged token's rank, then by the parts' ranks.
    merges = []
    for token, rank in ranks.items():
        splits = [(ranks[token[:i]], ranks[token[i:]], i) for i in range(1, len(token))
                  if token[:i] in ranks and token[i:] in ranks]
        merges += [(spell(token[:i]), spell(token[i:])) for _, _, i in sorted(splits)]
    offset = len(specials)
    vocab = {spell(token): rank + offset for token, rank in ranks.items()}
    vocab.update({token: index for index, token in enumerate(specials)})

    tokenizer = Tokenizer(BPE(vocab, merges, fuse_unk=False, ignore_merges=True))
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(config["pattern"]), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    named = {"unk_token": "<unk>", "bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>"}
    return tokenizer, {name: token for name, token in named.items() if token in specials}
