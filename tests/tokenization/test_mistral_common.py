"""MistralCommonBackend against transformers' class of the same name and mistral-common itself."""

import pytest
from conftest import MODEL_FILES, TEKKEN_FILES, mistral_common_data

pytest.importorskip("mistral_common")
from mistral_common.tokens.tokenizers.base import SpecialTokenPolicy  # noqa: E402
from mistral_common.tokens.tokenizers.mistral import MistralTokenizer  # noqa: E402
from transformers.tokenization_mistral_common import MistralCommonBackend as HFBackend  # noqa: E402

from maestrale.tokenization import MistralCommonBackend  # noqa: E402

FILES = {**MODEL_FILES, **TEKKEN_FILES}
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"},
            {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Weather in Paris?"}]
TOOL = {"type": "function", "function": {"name": "weather", "description": "Get weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string", "description": "City"}}, "required": ["city"]}}}


@pytest.fixture(scope="module", params=list(FILES))
def pair(request):
    path = mistral_common_data() / FILES[request.param]
    return MistralCommonBackend(path), HFBackend(str(path)), MistralTokenizer.from_file(str(path))


def test_corpus_matches_mistral_common(pair, corpus):
    ours, _, reference = pair
    raw = reference.instruct_tokenizer.tokenizer
    ids = [ours.encode(line) for line in corpus]
    assert ids == [raw.encode(line, bos=True, eos=False) for line in corpus]
    assert ours.batch_decode(ids) == [raw.decode(row, special_token_policy=SpecialTokenPolicy.KEEP) for row in ids]
    assert ours.batch_decode(ids, skip_special_tokens=True) == [raw.decode(row) for row in ids]


def test_methods_match_transformers(pair, corpus):
    ours, ref, _ = pair
    lines = corpus[:200]
    assert [ours.encode(t) for t in lines] == [ref.encode(t) for t in lines]
    assert [ours.tokenize(t) for t in lines[:50]] == [ref.tokenize(t) for t in lines[:50]]
    ids = ref.encode(lines[3])
    assert ours.decode(ids) == ref.decode(ids) and ours.decode(ids, skip_special_tokens=True) == ref.decode(ids, skip_special_tokens=True)
    assert ours.convert_ids_to_tokens(ids) == ref.convert_ids_to_tokens(ids)
    assert ours.get_vocab() == ref.get_vocab()
    assert ours.convert_tokens_to_ids(ours.convert_ids_to_tokens(ids[:20])) == ref.convert_tokens_to_ids(ref.convert_ids_to_tokens(ids[:20]))
    assert ours.get_special_tokens_mask(ids, already_has_special_tokens=True) == ref.get_special_tokens_mask(ids, already_has_special_tokens=True)
    assert ours.get_special_tokens_mask(ids[1:]) == ref.get_special_tokens_mask(ids[1:])
    assert (len(ours), ours.bos_token_id, ours.eos_token_id, ours.pad_token_id, ours.all_special_ids) == \
        (len(ref), ref.bos_token_id, ref.eos_token_id, ref.pad_token_id, ref.all_special_ids)
    for options in (dict(padding=True), dict(padding=True, return_tensors="pt"), dict(truncation=True, max_length=5),
                    dict(padding="max_length", max_length=40, truncation=True, return_tensors="np"),
                    dict(padding=True, pad_to_multiple_of=8, return_attention_mask=False)):
        mine, theirs = ours(lines[:4], **options), ref(lines[:4], **options)
        assert mine.keys() == theirs.keys()
        assert all(getattr(mine[k], "tolist", lambda: mine[k])() == getattr(theirs[k], "tolist", lambda: theirs[k])()
                   for k in mine), options
    assert dict(ours(lines[5])) == dict(ref(lines[5]))
    assert ours(lines[5], return_tensors="pt")["input_ids"].tolist() == ref(lines[5], return_tensors="pt")["input_ids"].tolist()
    assert ours.truncate_sequences(ids, num_tokens_to_remove=3, stride=2) == ref.truncate_sequences(ids, num_tokens_to_remove=3, stride=2)
    prepared = dict(ours.prepare_for_model(ids[1:], truncation=True, max_length=6, return_overflowing_tokens=True))
    assert prepared == dict(ref.prepare_for_model(ids[1:], truncation=True, max_length=6, return_overflowing_tokens=True))
    features = [dict(ours(t)) for t in lines[:3]]
    assert ours.pad(features) == dict(ref.pad([dict(f) for f in features]))


def test_chat_matches_transformers(pair):
    ours, ref, _ = pair
    for kwargs in (dict(), dict(tokenize=False), dict(tools=[TOOL]), dict(return_tensors="pt")):
        mine = ours.apply_chat_template(MESSAGES, **kwargs)
        theirs = ref.apply_chat_template(MESSAGES, **kwargs)
        if kwargs.get("return_tensors"):
            assert mine["input_ids"].tolist() == theirs["input_ids"].tolist()
        else:
            assert (dict(mine) if not isinstance(mine, str) else mine) == (dict(theirs) if not isinstance(theirs, str) else theirs)
    prefill = [*MESSAGES, {"role": "assistant", "content": "It is"}]
    assert dict(ours.apply_chat_template(prefill, continue_final_message=True)) == \
        dict(ref.apply_chat_template(prefill, continue_final_message=True))
    batch = [MESSAGES, MESSAGES[1:2]]
    assert ours.apply_chat_template(batch, padding=True, return_dict=False) == ref.apply_chat_template(batch, padding=True, return_dict=False)
    with pytest.raises(ValueError, match="assistant"):
        ours.apply_chat_template(MESSAGES[:3], add_generation_prompt=True)


def test_documented_restrictions(tmp_path):
    path = mistral_common_data() / TEKKEN_FILES["tekken_240911"]
    tok = MistralCommonBackend(path)
    with pytest.raises(ValueError, match="pairs"):
        tok("a", "b")
    with pytest.raises(ValueError, match="is_split_into_words"):
        tok(["a"], is_split_into_words=True)
    with pytest.raises(ValueError, match="not supported"):
        tok.encode("a", return_offsets_mapping=True)
    with pytest.raises(ValueError, match="not supported"):
        tok.decode([1, 2], spaces_between_special_tokens=True)
    with pytest.raises(NotImplementedError):
        tok.add_tokens(["<x>"])
    with pytest.raises(ValueError, match="Token id 999999"):
        tok.decode([1, 999999])
    # Special tokens written in text are plain text for mistral-common.
    assert tok.encode("[INST]", add_special_tokens=False) != [tok.convert_tokens_to_ids("[INST]")]
    saved = tok.save_pretrained(tmp_path / "saved")
    again = MistralCommonBackend.from_pretrained(tmp_path / "saved")
    assert saved == (str(tmp_path / "saved" / "tekken_240911.json"),) and again.encode("hé") == tok.encode("hé")
    with pytest.raises(OSError, match="No mistral-common tokenizer file"):
        MistralCommonBackend.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match="never runs code"):
        MistralCommonBackend.from_pretrained(tmp_path / "saved", trust_remote_code=True)
    finetuning = MistralCommonBackend(path, mode="finetuning")
    assert finetuning.encode("hi")[-1] == finetuning.eos_token_id
