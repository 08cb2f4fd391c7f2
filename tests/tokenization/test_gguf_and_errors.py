"""The GGUF metadata path on the real SmolLM2 fixture, and the errors bad input gets."""

import pytest
from conftest import SMOLLM2_GGUF, smollm2_folder

from maestrale.tokenization import AutoTokenizer, tokenizer_from_gguf


@pytest.fixture(scope="module")
def smollm2(hf_smollm2_tokenizer):
    return smollm2_folder(), hf_smollm2_tokenizer()


def test_gguf_metadata_tokenizer_matches_transformers(smollm2, corpus):
    from maestrale.loading.gguf import read_gguf

    folder, ref = smollm2
    _, _, metadata = read_gguf(f"{folder}/{SMOLLM2_GGUF}")
    ours = tokenizer_from_gguf(metadata)
    lines = corpus[:2000] + ["<|im_start|>user\nHi<|im_end|>\n", "<repo_name>x<|endoftext|>"]
    ids = ours(lines)["input_ids"]
    assert ids == ref(lines)["input_ids"]
    assert ours.batch_decode(ids) == ref.batch_decode(ids)
    assert ours.batch_decode(ids, skip_special_tokens=True) == ref.batch_decode(ids, skip_special_tokens=True)
    assert (ours.bos_token, ours.eos_token, ours.unk_token, ours.pad_token, len(ours), ours.padding_side) == \
        (ref.bos_token, ref.eos_token, ref.unk_token, ref.pad_token, len(ref), ref.padding_side)
    chat = [{"role": "user", "content": "What is 2+2?"}]
    assert ours.apply_chat_template(chat, add_generation_prompt=True, return_dict=False) == \
        ref.apply_chat_template(chat, add_generation_prompt=True, return_dict=False)


def test_gguf_through_auto_tokenizer(smollm2):
    folder, ref = smollm2
    ours = AutoTokenizer.from_pretrained(folder, gguf_file=SMOLLM2_GGUF)
    assert ours("Hello, GGUF!") == dict(ref("Hello, GGUF!"))


def test_decode_rejects_ids_outside_the_vocabulary(folders):
    tok = AutoTokenizer.from_pretrained(folders["v1"])
    with pytest.raises(ValueError, match="Token id 32000 is outside the vocabulary"):
        tok.decode([1, 2, 32000])
    with pytest.raises(ValueError, match="Token id -5"):
        tok.batch_decode([[1], [-5]])
    with pytest.raises(ValueError, match="Token id 99999"):
        tok.convert_ids_to_tokens(99999)


def test_missing_tokenizer_file_names_folder_and_files(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(OSError) as error:
        AutoTokenizer.from_pretrained(tmp_path)
    message = str(error.value)
    assert str(tmp_path) in message and "tokenizer.json" in message and "tokenizer.model" in message
    assert "tekken.json" in message and "config.json" in message


def test_other_bad_input(folders, tmp_path):
    with pytest.raises(ValueError, match="never runs code"):
        AutoTokenizer.from_pretrained(folders["v1"], trust_remote_code=True)
    tok = AutoTokenizer.from_pretrained(folders["v1"])
    with pytest.raises(ValueError, match="no pad token"):
        tok(["a", "b c"], padding=True)
    with pytest.raises(ValueError, match="padding=True"):
        tok(["a", "b c"], return_tensors="pt")
    with pytest.raises(ValueError, match="return_tensors='tf'"):
        tok("a", return_tensors="tf")
    with pytest.raises(OSError, match="not a local folder"):
        AutoTokenizer.from_pretrained("no-such-org/no-such-model", local_files_only=True)
    (tmp_path / "tokenizer.model").write_bytes(b"not a protobuf at all")
    with pytest.raises(ValueError, match="not a SentencePiece model"):
        AutoTokenizer.from_pretrained(tmp_path)
