"""The tokenizer surface people use, compared with transformers on the same files."""

import json

import numpy as np
import pytest
import torch
from conftest import SMOLLM2_GGUF, smollm2_folder
from transformers import AutoTokenizer as HFAutoTokenizer

from maestrale.tokenization import AutoTokenizer, BatchEncoding, PreTrainedTokenizerFast

TEXTS = ["Hello world!", "A much longer sentence, with more tokens in it than the first one.", "日本語 😀", " x"]
PAIRS = ["Second part.", "b", "c c c c c c c", "d"]


@pytest.fixture(scope="module", params=["smollm2", "v3", "phi3"])
def pair(request, folders):
    if request.param == "smollm2":
        return (AutoTokenizer.from_pretrained(smollm2_folder(), gguf_file=SMOLLM2_GGUF),
                request.getfixturevalue("hf_smollm2_tokenizer")())
    ours, ref = AutoTokenizer.from_pretrained(folders[request.param]), HFAutoTokenizer.from_pretrained(folders[request.param])
    if ours.pad_token is None:
        ours.pad_token = ref.pad_token = "</s>"
    return ours, ref


def same(a, b):
    assert set(a.keys()) == set(b.keys()), (a.keys(), b.keys())
    for key in a:
        x, y = a[key], b[key]
        if isinstance(y, (torch.Tensor, np.ndarray)):
            assert type(x) is type(y) and x.tolist() == y.tolist(), key
        else:
            assert x == y, key


CALLS = {
    "single": dict(text=TEXTS[0]),
    "batch": dict(text=TEXTS),
    "pairs": dict(text=TEXTS, text_pair=PAIRS),
    "single_pair": dict(text=TEXTS[0], text_pair=PAIRS[0]),
    "longest": dict(text=TEXTS, padding=True),
    "longest_str": dict(text=TEXTS, padding="longest", padding_side="left"),
    "max_length": dict(text=TEXTS, padding="max_length", max_length=20, truncation=True),
    "multiple_of": dict(text=TEXTS, padding=True, pad_to_multiple_of=8),
    "truncate": dict(text=TEXTS, truncation=True, max_length=5),
    "max_length_only": dict(text=TEXTS, max_length=4),
    "truncate_pairs": dict(text=TEXTS, text_pair=PAIRS, truncation="longest_first", max_length=9),
    "truncate_first": dict(text=TEXTS[1:2], text_pair=PAIRS[:1], truncation="only_first", max_length=12),
    "overflow": dict(text=TEXTS, truncation=True, max_length=6, stride=2, return_overflowing_tokens=True),
    "overflow_single": dict(text=TEXTS[1], truncation=True, max_length=6, stride=1, return_overflowing_tokens=True),
    "pt": dict(text=TEXTS, padding=True, return_tensors="pt"),
    "pt_single": dict(text=TEXTS[1], return_tensors="pt"),
    "np": dict(text=TEXTS, padding=True, return_tensors="np"),
    "extras": dict(text=TEXTS, return_offsets_mapping=True, return_special_tokens_mask=True, return_length=True,
                   return_token_type_ids=True),
    "no_mask": dict(text=TEXTS, return_attention_mask=False, add_special_tokens=False),
    "words": dict(text=[["Hello", "big", "world"], ["x"]], is_split_into_words=True),
    "target": dict(text=TEXTS, text_target=PAIRS),
    "target_only": dict(text_target=TEXTS[0]),
    "target_pairs_pt": dict(text=TEXTS, text_target=TEXTS, text_pair_target=PAIRS, padding=True, return_tensors="pt"),
    "target_truncated": dict(text=TEXTS[1], text_target=TEXTS[1], truncation=True, max_length=5),
}


@pytest.mark.parametrize("call", list(CALLS))
def test_call_matches_transformers(pair, call):
    ours, ref = pair
    out = ours(**CALLS[call])
    assert isinstance(out, BatchEncoding)
    same(out, ref(**CALLS[call]))


def test_encode_decode_and_conversions(pair):
    ours, ref = pair
    for text in TEXTS:
        assert ours.encode(text) == ref.encode(text)
        assert ours.tokenize(text) == ref.tokenize(text)
        ids = ref.encode(text)
        assert ours.decode(ids) == ref.decode(ids)
        assert ours.decode(torch.tensor(ids), skip_special_tokens=True) == ref.decode(ids, skip_special_tokens=True)
        assert ours.convert_ids_to_tokens(ids) == ref.convert_ids_to_tokens(ids)
        assert ours.convert_tokens_to_ids(ref.convert_ids_to_tokens(ids)) == ids
        assert ours.convert_ids_to_tokens(ids[0]) == ref.convert_ids_to_tokens(ids[0])
    assert ours.encode(TEXTS[1], return_tensors="pt").tolist() == ref.encode(TEXTS[1], return_tensors="pt").tolist()
    batch = ref(TEXTS, padding=True, return_tensors="pt")["input_ids"]
    assert ours.batch_decode(batch, skip_special_tokens=True) == ref.batch_decode(batch, skip_special_tokens=True)
    assert ours.batch_decode(batch) == ref.batch_decode(batch)
    spaced = ref.encode("Hello , world . It 's n't")
    assert ours.decode(spaced, clean_up_tokenization_spaces=True) == ref.decode(spaced, clean_up_tokenization_spaces=True)
    assert ours.get_vocab() == ref.get_vocab() and len(ours) == len(ref)
    for name in ("bos_token", "eos_token", "unk_token", "pad_token", "bos_token_id", "eos_token_id", "pad_token_id",
                 "padding_side", "model_max_length"):
        assert getattr(ours, name) == getattr(ref, name), name


def test_pad_matches_transformers(pair):
    ours, ref = pair
    features = [ref(t) for t in TEXTS]
    same(ours.pad([dict(f) for f in features]), ref.pad([dict(f) for f in features]))
    same(ours.pad([dict(f) for f in features], return_tensors="pt", padding="max_length", max_length=30),
         ref.pad([dict(f) for f in features], return_tensors="pt", padding="max_length", max_length=30))
    same(ours.pad({"input_ids": [f["input_ids"] for f in features]}, pad_to_multiple_of=16, padding_side="left"),
         ref.pad({"input_ids": [f["input_ids"] for f in features]}, pad_to_multiple_of=16, padding_side="left"))


def test_added_tokens_match_transformers(folders):
    ours, ref = AutoTokenizer.from_pretrained(folders["v1"]), HFAutoTokenizer.from_pretrained(folders["v1"])
    assert ours.add_tokens(["<think>", "hello"]) == ref.add_tokens(["<think>", "hello"])
    assert ours.add_special_tokens({"pad_token": "<pad>", "additional_special_tokens": ["<tool>"]}) == \
        ref.add_special_tokens({"pad_token": "<pad>", "additional_special_tokens": ["<tool>"]})
    text = "a<think>b <tool> hello there<pad>"
    assert ours(text)["input_ids"] == ref(text)["input_ids"]
    ids = ours(text)["input_ids"]
    assert ours.decode(ids, skip_special_tokens=True) == ref.decode(ids, skip_special_tokens=True)
    assert ours.pad_token_id == ref.pad_token_id == 32001 and len(ours) == len(ref)
    assert ours.get_added_vocab() == ref.get_added_vocab()


def test_save_pretrained_round_trips(folders, tmp_path):
    ours = AutoTokenizer.from_pretrained(folders["phi3"], chat_template="{{ bos_token }}{{ messages[0].content }}")
    ours.add_tokens(["<new>"])
    ours.model_max_length = 4096
    files = ours.save_pretrained(tmp_path / "saved")
    assert {f.rsplit("/", 1)[-1] for f in files} == {"tokenizer.json", "tokenizer_config.json", "chat_template.jinja"}
    again = AutoTokenizer.from_pretrained(tmp_path / "saved")
    theirs = HFAutoTokenizer.from_pretrained(tmp_path / "saved")
    text = ["<|user|>\nhi <new> there<|end|>\n<|assistant|>", " two  spaces"]
    assert again(text) == ours(text)
    assert theirs(text)["input_ids"] == ours(text)["input_ids"]
    for tok in (again, theirs):
        assert (tok.model_max_length, tok.padding_side, tok.eos_token, tok.pad_token, tok.add_bos_token) == \
            (4096, "left", "<|endoftext|>", "<|endoftext|>", False)
        assert tok.chat_template == ours.chat_template
    assert again.get_vocab() == ours.get_vocab() == theirs.get_vocab()


def test_special_tokens_map_file_and_template_file(folders, tmp_path):
    folder = tmp_path / "t"
    folder.mkdir()
    (folder / "tokenizer.model").write_bytes((folders["v1"] / "tokenizer.model").read_bytes())
    (folder / "special_tokens_map.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>",
                                                                "pad_token": "<unk>"}))
    (folder / "tokenizer_config.json").write_text(json.dumps({"add_bos_token": True, "add_eos_token": True,
                                                              "truncation_side": "left", "model_max_length": 8}))
    (folder / "chat_template.jinja").write_text("{% for m in messages %}{{ m.content }}{% endfor %}")
    ours, ref = AutoTokenizer.from_pretrained(folder), HFAutoTokenizer.from_pretrained(folder)
    for tok in (ours, ref):
        assert (tok.pad_token, tok.truncation_side, tok.model_max_length) == ("<unk>", "left", 8)
    assert ours("one two three four five six seven", truncation=True) == \
        dict(ref("one two three four five six seven", truncation=True))
    assert ours.apply_chat_template([{"role": "user", "content": "hey"}], tokenize=False) == "hey"


def test_batch_encoding_access():
    enc = BatchEncoding({"input_ids": [[1, 2]], "attention_mask": [[1, 1]]}, tensor_type="pt")
    assert enc.input_ids is enc["input_ids"] and isinstance(enc.attention_mask, torch.Tensor)
    assert enc.to("cpu") is enc and dict(**enc).keys() == {"input_ids", "attention_mask"}
    with pytest.raises(AttributeError, match="no field 'pixel_values'"):
        enc.pixel_values


def test_tokenizer_from_tokenizer_object():
    from tokenizers import Tokenizer, models, pre_tokenizers

    backend = Tokenizer(models.WordLevel({"[UNK]": 0, "a": 1, "b": 2}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(backend, unk_token="[UNK]", pad_token="[UNK]")
    assert tok(["a b", "b"], padding=True)["input_ids"] == [[1, 2], [2, 0]]


def test_character_alignment(pair):
    ours, ref = pair
    mine, theirs = ours(TEXTS[1], return_offsets_mapping=True), ref(TEXTS[1])
    assert [mine.char_to_token(i) for i in range(20)] == [theirs.char_to_token(i) for i in range(20)]
    with pytest.raises(ValueError, match="return_offsets_mapping=True"):
        ours(TEXTS[1]).char_to_token(3)
