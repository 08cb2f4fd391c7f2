"""from_pretrained options as transformers handles them: num_labels with ignore_mismatched_sizes, use_safetensors,
name_or_path; save_pretrained(state_dict=)."""

import logging

import pytest
import torch
import transformers
from safetensors.torch import load_file

import maestrale
from parity import model_pair

IDS = torch.tensor([[5, 17, 3, 88, 41, 9], [7, 7, 12, 90, 1, 33]])


@pytest.fixture(scope="module")
def three_labels(tmp_path_factory):
    ref, _ = model_pair("mistral", "ForSequenceClassification", num_labels=3)
    folder = tmp_path_factory.mktemp("three_labels")
    ref.save_pretrained(folder)
    return folder


def test_num_labels_1_reinitialises_the_head_and_regresses(three_labels, caplog):
    ref = transformers.AutoModelForSequenceClassification.from_pretrained(three_labels, num_labels=1,
                                                                          ignore_mismatched_sizes=True)
    with caplog.at_level(logging.WARNING, logger="maestrale.loading"):
        ours, info = maestrale.AutoModelForSequenceClassification.from_pretrained(
            three_labels, num_labels=1, ignore_mismatched_sizes=True, output_loading_info=True)
    assert ours.config.num_labels == ref.config.num_labels == 1
    assert ours.config.id2label == ref.config.id2label == {0: "LABEL_0"}
    assert ours.score.weight.shape == ref.score.weight.shape == (1, 32)
    assert info["mismatched_keys"] == [("score.weight", (3, 32), (1, 32))]
    notice = [r.message for r in caplog.records if "newly initialised" in r.message]
    assert len(notice) == 1 and "score.weight (checkpoint [3, 32], model [1, 32])" in notice[0]
    state = ref.state_dict()
    for name, tensor in ours.state_dict().items():
        if name != "score.weight":
            assert torch.equal(tensor, state[name]), name
    with torch.no_grad():
        ours.score.weight.copy_(ref.score.weight)  # each library draws its new head with its own random numbers
    labels = torch.tensor([0.5, -1.0])
    expected, got = ref(IDS, labels=labels), ours(IDS, labels=labels)
    torch.testing.assert_close(got.logits, expected.logits)
    torch.testing.assert_close(got.loss, expected.loss)
    assert ours.config.problem_type == ref.config.problem_type == "regression"


def test_num_labels_mismatch_without_ignoring_is_refused(three_labels):
    with pytest.raises(RuntimeError, match="ignore_mismatched_sizes"):
        transformers.AutoModelForSequenceClassification.from_pretrained(three_labels, num_labels=1)
    with pytest.raises(RuntimeError, match=r"(?s)score.weight: checkpoint \[3, 32\], model \[1, 32\].*"
                                           r"ignore_mismatched_sizes=True"):
        maestrale.AutoModelForSequenceClassification.from_pretrained(three_labels, num_labels=1)


@pytest.fixture(scope="module")
def both_formats(tmp_path_factory):
    """A folder with model.safetensors and a pytorch_model.bin holding other weights (doubled)."""
    ref, _ = model_pair("mistral")
    folder = tmp_path_factory.mktemp("both_formats")
    ref.save_pretrained(folder)
    torch.save({k: v * 2 for k, v in ref.state_dict().items()}, folder / "pytorch_model.bin")
    return folder


def logits(model):
    with torch.no_grad():
        return model(IDS).logits


@pytest.mark.parametrize("use_safetensors", [None, True, False])
def test_use_safetensors_picks_the_format_transformers_picks(both_formats, use_safetensors):
    ref = transformers.AutoModelForCausalLM.from_pretrained(both_formats, use_safetensors=use_safetensors)
    ours = maestrale.AutoModelForCausalLM.from_pretrained(both_formats, use_safetensors=use_safetensors)
    assert torch.equal(ours.model.norm.weight, ref.model.norm.weight)
    torch.testing.assert_close(logits(ours), logits(ref))


def test_use_safetensors_true_without_safetensors_is_an_error(both_formats, tmp_path):
    (tmp_path / "config.json").write_bytes((both_formats / "config.json").read_bytes())
    (tmp_path / "pytorch_model.bin").write_bytes((both_formats / "pytorch_model.bin").read_bytes())
    with pytest.raises(OSError):
        transformers.AutoModelForCausalLM.from_pretrained(tmp_path, use_safetensors=True)
    with pytest.raises(OSError, match="no model.safetensors .*use_safetensors=True asks for; pass "
                                      "use_safetensors=False"):
        maestrale.AutoModelForCausalLM.from_pretrained(tmp_path, use_safetensors=True)
    ref = transformers.AutoModelForCausalLM.from_pretrained(tmp_path)
    torch.testing.assert_close(logits(maestrale.AutoModelForCausalLM.from_pretrained(tmp_path)), logits(ref))


def test_use_safetensors_false_without_bin_is_an_error(tmp_path):
    ref, _ = model_pair("mistral")
    ref.save_pretrained(tmp_path)
    with pytest.raises(OSError):
        transformers.AutoModelForCausalLM.from_pretrained(tmp_path, use_safetensors=False)
    with pytest.raises(OSError, match="no pytorch_model.bin .*use_safetensors=False"):
        maestrale.AutoModelForCausalLM.from_pretrained(tmp_path, use_safetensors=False)


@pytest.mark.parametrize("as_path", [False, True], ids=["str", "Path"])
def test_name_or_path(both_formats, as_path):
    source = both_formats if as_path else str(both_formats)
    ref = transformers.AutoModelForCausalLM.from_pretrained(source)
    ours = maestrale.AutoModelForCausalLM.from_pretrained(source)
    assert ours.name_or_path == ref.name_or_path == str(both_formats)
    assert ours.config.name_or_path == ref.config.name_or_path
    fresh_ref, fresh = model_pair("mistral")
    assert fresh.name_or_path == fresh_ref.name_or_path == ""


@pytest.mark.parametrize("family, overrides", [("mistral", dict(tie_word_embeddings=True)),
                                               ("mixtral", dict(num_local_experts=2))])
def test_save_pretrained_state_dict(family, overrides, tmp_path):
    ref, ours = model_pair(family, **overrides)
    doubled = {k: v * 2 for k, v in ours.state_dict().items()}
    if overrides.get("tie_word_embeddings"):
        doubled["lm_head.weight"] = doubled["model.embed_tokens.weight"]  # tied: one tensor under two names
    ours.save_pretrained(tmp_path / "ours", state_dict=doubled)
    ref.save_pretrained(tmp_path / "ref", state_dict=dict(doubled))  # transformers empties the dict it is given
    files = load_file(tmp_path / "ours" / "model.safetensors")
    expected = load_file(tmp_path / "ref" / "model.safetensors")
    assert sorted(files) == sorted(expected)
    for name, tensor in expected.items():
        assert torch.equal(files[name], tensor), name
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ours")
    for name, tensor in back.state_dict().items():
        assert torch.equal(tensor, doubled[name]), name
    assert torch.equal(ours.model.norm.weight * 2, doubled["model.norm.weight"])  # the model itself is unchanged
