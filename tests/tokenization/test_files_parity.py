"""Ids and text equal to transformers (and mistral-common) on the real tokenizer files of mistral-common."""

import pytest
from conftest import MODEL_FILES, TEKKEN_FILES, mistral_common_data
from transformers import AutoTokenizer as HFAutoTokenizer

from maestrale.tokenization import AutoTokenizer


@pytest.mark.parametrize("name", list(MODEL_FILES))
def test_sentencepiece_files_match_transformers(name, folders, corpus):
    ours = AutoTokenizer.from_pretrained(folders[name])
    ref = HFAutoTokenizer.from_pretrained(folders[name])
    assert len(ours) == len(ref) and ours.get_vocab() == ref.get_vocab()
    ids = ours(corpus)["input_ids"]
    assert ids == ref(corpus)["input_ids"]
    assert all(row[0] == ours.bos_token_id for row in ids)
    assert ours.batch_decode(ids) == ref.batch_decode(ids)
    assert ours.batch_decode(ids, skip_special_tokens=True) == ref.batch_decode(ids, skip_special_tokens=True)
    # Special tokens written in the text are matched whole, and the text after them is prefixed as transformers does.
    text = ["[INST] Hi [/INST] ok</s>", "<s>x<unk> y", " [TOOL_CALLS][{\"a\": 1}]"]
    assert ours(text)["input_ids"] == ref(text)["input_ids"]


def test_legacy_prefixing_matches_transformers(tmp_path):
    from conftest import llama_folder

    folder = llama_folder(tmp_path, MODEL_FILES["v3"], legacy=True)
    text = ["[INST] Hi [/INST] ok</s> more", "a[INST]b"]
    assert AutoTokenizer.from_pretrained(folder)(text)["input_ids"] == HFAutoTokenizer.from_pretrained(folder)(text)["input_ids"]


@pytest.mark.parametrize("name", list(TEKKEN_FILES))
def test_tekken_files_match_transformers_and_mistral_common(name, folders, corpus):
    from mistral_common.tokens.tokenizers.tekken import Tekkenizer
    from transformers.integrations.mistral.tokenizer import MistralConverter

    path = folders[name] / "tekken.json"
    ours = AutoTokenizer.from_pretrained(folders[name])
    converted = MistralConverter(str(path)).converted()
    ids = ours(corpus, add_special_tokens=False)["input_ids"]
    assert ids == [e.ids for e in converted.encode_batch(corpus, add_special_tokens=False)]
    tekken = Tekkenizer.from_file(path)
    assert ids == [tekken.encode(line, bos=False, eos=False) for line in corpus]
    assert ours.batch_decode(ids) == [tekken.decode(row) for row in ids] == corpus
    assert ours.bos_token_id == tekken.bos_id and ours.eos_token_id == tekken.eos_id and len(ours) == tekken.n_words


def test_corpus_is_varied(corpus):
    text = "".join(corpus)
    assert len(corpus) >= 5000
    for probe in ("ж", "ש", "的", "한", "ก", "👨‍👩‍👧‍👦", "\x00", "      ", "\n\n\n", "def f(x)"):
        assert probe in text, probe
    assert max(len(word) for line in corpus for word in line.split()) > 200


def test_mistral_common_data_present():
    assert {p.name for p in mistral_common_data().iterdir()} >= {*MODEL_FILES.values(), *TEKKEN_FILES.values()}


@pytest.mark.parametrize("name", list(MODEL_FILES))
def test_sentencepiece_only_folder_matches_transformers_and_sentencepiece(name, tmp_path, corpus):
    """A folder with nothing but tokenizer.model (no tokenizer_config.json): transformers encodes as SentencePiece
    does (runs of spaces, leading spaces, indented code), and matches control tokens written in the text whole."""
    import shutil

    import sentencepiece
    from test_saved_json import assert_same, special_token_corpus, specials_of

    shutil.copy(mistral_common_data() / MODEL_FILES[name], tmp_path / "tokenizer.model")
    ours, ref = AutoTokenizer.from_pretrained(tmp_path), HFAutoTokenizer.from_pretrained(tmp_path)
    spaces = ["a  b", "    indented", "line\n    code", " leading", "  ", "trailing  ", "a \n b", "\n  x"]
    assert_same(ours, ref, spaces + corpus[::5] + special_token_corpus(specials_of(ref)))
    processor = sentencepiece.SentencePieceProcessor(model_file=str(tmp_path / "tokenizer.model"))
    plain = spaces + [line for line in corpus[::5] if "[" not in line and "<" not in line]
    assert ours(plain, add_special_tokens=False)["input_ids"] == processor.encode(plain)
