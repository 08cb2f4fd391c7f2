"""Pre-quantized folders both ways: what maestrale saves, transformers loads (and the other way round), with the
same files, config.json quantization_config, packed tensors and logits; nothing is quantized a second time."""

import json

import pytest
import torch
import transformers
from safetensors.torch import load_file

import maestrale
from quantized import OPTIONS, PROMPT, assert_same_state, load_both


@pytest.mark.parametrize("family, option", [("mistral", "nf4-double"), ("mixtral", "fp4"), ("phi3", "int8"),
                                            ("ministral", "nf4")])
def test_saved_quantized_folders_cross_over(family, option, family_folder, tmp_path):
    # Saved and compared before either runs: on AVX512-BF16 machines, bitsandbytes repacks 4-bit weights at the first
    # inference forward, and its state_dict's way back rounds the quant state through bfloat16 (saving after a
    # forward: test_maestrale_reads_its_own_folder_after_a_forward).
    ref, ours = load_both(family_folder(family), OPTIONS[option])
    ref.save_pretrained(tmp_path / "by-transformers")
    ours.save_pretrained(tmp_path / "by-maestrale")
    a, b = (load_file(tmp_path / name / "model.safetensors") for name in ("by-transformers", "by-maestrale"))
    assert sorted(a) == sorted(b)
    for name in a:
        assert a[name].dtype == b[name].dtype and torch.equal(a[name].view(torch.uint8), b[name].view(torch.uint8))
    saved = [json.loads((tmp_path / name / "config.json").read_text())["quantization_config"]
             for name in ("by-transformers", "by-maestrale")]
    assert saved[1] == saved[0]

    # Each library reads the other's folder as saved: no quantization_config passed, nothing quantized again.
    ours_again = maestrale.AutoModelForCausalLM.from_pretrained(tmp_path / "by-transformers")
    ref_again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "by-maestrale")
    assert_same_state(ref, ours_again)
    assert_same_state(ref, ref_again)
    assert ours_again.is_loaded_in_4bit == ("4" in option) and ours_again.is_loaded_in_8bit == (option == "int8")
    with torch.no_grad():
        expected = ref(PROMPT).logits
        torch.testing.assert_close(ours_again(PROMPT).logits, expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(ref_again(PROMPT).logits, expected, rtol=1e-5, atol=1e-5)


def test_maestrale_reads_its_own_folder_after_a_forward(family_folder, tmp_path):
    """Saving after the model ran (bitsandbytes may have repacked CPU weights) writes the portable layout."""
    _, ours = load_both(family_folder("mistral"), OPTIONS["nf4"])
    with torch.no_grad():
        expected = ours(PROMPT).logits
    ours.save_pretrained(tmp_path)
    again = maestrale.AutoModelForCausalLM.from_pretrained(tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(again(PROMPT).logits, expected, rtol=0, atol=0)
    assert again.config.quantization_config == ours.config.quantization_config


@pytest.mark.parametrize("option", ["nf4", "nf4-double"])
def test_saving_leaves_the_model_as_it_runs(option, family_folder, tmp_path):
    """Saving after a forward (bitsandbytes may have repacked CPU weights) changes no product."""
    _, ours = load_both(family_folder("mistral"), OPTIONS[option])
    with torch.no_grad():
        expected = ours(PROMPT).logits
        ours.save_pretrained(tmp_path)
        torch.testing.assert_close(ours(PROMPT).logits, expected, rtol=0, atol=0)


@pytest.mark.parametrize("option", ["nf4", "nf4-double"])
def test_saved_after_a_forward_like_transformers(option, family_folder, tmp_path):
    """After an inference forward (where bitsandbytes repacks CPU weights on AVX512-BF16 machines) both libraries save
    the same bytes, but for an unnested absmax that transformers saves as bitsandbytes' inverse leaves it, in the
    packed layout (bfloat16, blocks by rows): maestrale saves those values in the portable layout."""
    ref, ours = load_both(family_folder("mistral"), OPTIONS[option])
    with torch.no_grad():
        ref(PROMPT), ours(PROMPT)
    ref.save_pretrained(tmp_path / "by-transformers")
    ours.save_pretrained(tmp_path / "by-maestrale")
    a, b = (load_file(tmp_path / name / "model.safetensors") for name in ("by-transformers", "by-maestrale"))
    assert sorted(a) == sorted(b)
    for name in a:
        if name.endswith(".absmax") and a[name].dim() == 2:
            a[name] = a[name].T.reshape(-1).float()
        assert a[name].dtype == b[name].dtype and torch.equal(a[name].view(torch.uint8), b[name].view(torch.uint8)), name


def test_other_methods_in_a_saved_config_are_refused_by_name(family_folder, tmp_path):
    _, ours = load_both(family_folder("mistral"), OPTIONS["nf4"])
    ours.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "eetq"}
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(NotImplementedError, match=r"config\.json asks for eetq quantization"):
        maestrale.AutoModelForCausalLM.from_pretrained(tmp_path)
