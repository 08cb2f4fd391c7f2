"""tokenizer.json files written by transformers' save_pretrained, loaded back with each tokenizer_config.json
combination transformers honours for them: ids, offsets and decoded text equal transformers' on text placed right
before and after every special and control token, and on the mixed corpus."""

import itertools
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import MODEL_FILES, TEKKEN_FILES, TEMPLATES, llama_folder, mistral_common_data
from transformers import AutoTokenizer as HFAutoTokenizer

from maestrale.tokenization import AutoTokenizer

# What stands between a special token and the text around it.
GLUES = ["", " ", "   ", "\n", "\n\n ", "\t"]
WORDS = ["aaaa", "Hi", "x", "▁", "’s", "12", "的", "🙂", "[INST", "</"]


def special_token_corpus(tokens: list[str]) -> list[str]:
    """Text right before and after each token, glued by nothing, spaces, newlines or another special token."""
    lines = []
    for i, token in enumerate(tokens):
        other = tokens[(i * 7 + 3) % len(tokens)]
        for j, (left, right) in enumerate(itertools.product(GLUES, GLUES)):
            word = WORDS[(i + j) % len(WORDS)]
            lines.append(f"{word}{left}{token}{right}{WORDS[(i + 2 * j + 1) % len(WORDS)]}")
        lines += [f"{token}{other}", f"{token} {other} {token}", f"{token}", f" {token}", f"{token} ",
                  f"{token}{token}x", f"a {token}\n{other}b"]
    return lines


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """saved(name, source_config, tokenizer_config): a folder of the mistral-common file `name` as transformers loads
    it with `source_config` and saves it (tokenizer.json, no tokenizer.model); then `tokenizer_config` (when given)
    replaces the fields it names in the saved config. transformers converts each source once (seconds each)."""
    sources = {}

    def make(name: str, source_config: dict, tokenizer_config: dict | None) -> Path:
        key = (name, json.dumps(source_config, sort_keys=True))
        if key not in sources:
            root = tmp_path_factory.mktemp("source")
            if name in MODEL_FILES:
                source = llama_folder(root, MODEL_FILES[name], **source_config)
            else:
                source = root / "source"
                source.mkdir()
                shutil.copy(mistral_common_data() / TEKKEN_FILES[name], source / "tekken.json")
            sources[key] = root / "saved"
            HFAutoTokenizer.from_pretrained(source).save_pretrained(sources[key])
            (sources[key] / "tokenizer.model").unlink(missing_ok=True)
            assert (sources[key] / "tokenizer.json").is_file()
        folder = tmp_path_factory.mktemp("saved")
        shutil.copytree(sources[key], folder, dirs_exist_ok=True)
        if tokenizer_config is not None:
            path = folder / "tokenizer_config.json"
            config = json.loads(path.read_text())
            for field, value in tokenizer_config.items():
                if value is None:
                    config.pop(field, None)
                else:
                    config[field] = value
            path.write_text(json.dumps(config))
        return folder

    return make


def assert_same(ours, ref, lines: list[str]) -> None:
    mine = ours(lines, return_offsets_mapping=True)
    theirs = ref(lines, return_offsets_mapping=True)
    for i, line in enumerate(lines):
        assert mine["input_ids"][i] == theirs["input_ids"][i], (line, ours.convert_ids_to_tokens(mine["input_ids"][i]),
                                                                ref.convert_ids_to_tokens(theirs["input_ids"][i]))
        assert [tuple(o) for o in mine["offset_mapping"][i]] == [tuple(o) for o in theirs["offset_mapping"][i]], line
    ids = theirs["input_ids"]
    assert ours.batch_decode(ids) == ref.batch_decode(ids)
    assert ours.batch_decode(ids, skip_special_tokens=True) == ref.batch_decode(ids, skip_special_tokens=True)


def specials_of(ref) -> list[str]:
    """Every added (special or control) token of the tokenizer, by id, with a few from the end of a large set."""
    tokens = [t.content for _, t in sorted(ref.added_tokens_decoder.items())]
    return tokens[:40] + tokens[-8:] if len(tokens) > 48 else tokens


# (config of the folder transformers loads, then fields written into the saved config; None: field removed).
LLAMA_CASES = [({"legacy": legacy}, None) for legacy in (True, False)] + [
    ({"legacy": True}, {"legacy": legacy, "add_prefix_space": prefix})
    for legacy, prefix in itertools.product((True, False), (True, False, None))
] + [({"legacy": False}, {"add_bos_token": bos, "add_eos_token": eos})
     for bos, eos in ((False, False), (True, True), (False, True))]


@pytest.mark.slow
@pytest.mark.parametrize("name", list(MODEL_FILES))
@pytest.mark.parametrize("case", range(len(LLAMA_CASES)))
def test_saved_sentencepiece_json_matches_transformers(name, case, saved, corpus):
    source_config, tokenizer_config = LLAMA_CASES[case]
    folder = saved(name, source_config, tokenizer_config)
    ours, ref = AutoTokenizer.from_pretrained(folder), HFAutoTokenizer.from_pretrained(folder)
    assert ours.get_vocab() == ref.get_vocab()
    assert_same(ours, ref, special_token_corpus(specials_of(ref)))
    assert_same(ours, ref, corpus[:: 10 if case else 1])


@pytest.mark.slow
@pytest.mark.parametrize("name", list(TEKKEN_FILES))
@pytest.mark.parametrize("tokenizer_config", [None, {"legacy": True, "add_prefix_space": True},
                                              {"add_prefix_space": False, "add_bos_token": True, "add_eos_token": True}])
def test_saved_tekken_json_matches_transformers(name, tokenizer_config, saved, corpus):
    folder = saved(name, {}, tokenizer_config)
    ours, ref = AutoTokenizer.from_pretrained(folder), HFAutoTokenizer.from_pretrained(folder)
    assert ours.get_vocab() == ref.get_vocab()
    assert_same(ours, ref, special_token_corpus(specials_of(ref)))
    assert_same(ours, ref, corpus[::10])


def test_text_after_a_control_token_gets_no_prefix_piece(saved):
    """The case of the report: v3 saved as tokenizer.json, text glued to [/INST]."""
    folder = saved("v3", {"legacy": True, "add_bos_token": True}, None)
    text = "[INST] not a control token [/INST]aaaa"
    ours, ref = AutoTokenizer.from_pretrained(folder), HFAutoTokenizer.from_pretrained(folder)
    assert ours.tokenize(text) == ref.tokenize(text)
    assert ours(text)["input_ids"] == ref(text)["input_ids"]


# Run in a process where sentencepiece cannot be imported (as where transformers serve lacks it).
WITHOUT_SENTENCEPIECE = """
import json, sys
sys.modules["sentencepiece"] = None
from transformers import AutoTokenizer
from transformers.utils import is_sentencepiece_available
assert not is_sentencepiece_available()
tokenizer, lines = AutoTokenizer.from_pretrained(sys.argv[1]), json.load(sys.stdin)
chat = tokenizer.apply_chat_template([{"role": "user", "content": lines[0]}], tokenize=False, add_generation_prompt=True)
print(json.dumps([tokenizer(lines)["input_ids"], chat, tokenizer(chat, add_special_tokens=False)["input_ids"]]))
"""


def test_our_save_of_a_sentencepiece_model_loads_in_transformers_without_sentencepiece(tmp_path, corpus):
    """maestrale's save of a tokenizer.model (tokenizer.json; what benchmarks/serve.py --random-model writes) loads
    in transformers without sentencepiece and encodes the corpus and a chat prompt as maestrale does."""
    source = tmp_path / "source"
    source.mkdir()
    shutil.copy(mistral_common_data() / MODEL_FILES["v3"], source / "tokenizer.model")
    ours = AutoTokenizer.from_pretrained(source)
    ours.chat_template = (TEMPLATES / "Mistral-7B-Instruct-v0.3.jinja").read_text()
    ours.save_pretrained(tmp_path / "saved")
    lines = corpus[::10]
    done = subprocess.run([sys.executable, "-c", WITHOUT_SENTENCEPIECE, str(tmp_path / "saved")],
                          input=json.dumps(lines), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    ids, chat, chat_ids = json.loads(done.stdout.splitlines()[-1])
    assert ids == ours(lines)["input_ids"]
    assert chat == ours.apply_chat_template([{"role": "user", "content": lines[0]}], tokenize=False,
                                            add_generation_prompt=True)
    assert chat_ids == ours(chat, add_special_tokens=False)["input_ids"]
