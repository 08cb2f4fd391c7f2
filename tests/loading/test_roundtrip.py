"""Checkpoints move both ways between transformers and maestrale, for every family, sharded or not, fp32 or bf16."""

import json
import logging

import pytest
import torch
import transformers

import maestrale
from parity import model_pair

FAMILIES = {"mistral": {}, "ministral": {"sliding_window": 5, "layer_types": ["full_attention", "sliding_attention",
                                                                            "sliding_attention"]},
            "mixtral": {"num_local_experts": 4}, "phi3": {"pad_token_id": 0, "eos_token_id": 2}}
IDS = torch.tensor([[5, 17, 3, 88, 41, 9, 60, 2], [7, 7, 12, 90, 1, 33, 4, 50]])


def logits(model, dtype=torch.float32):
    with torch.no_grad():
        return model(IDS).logits.to(dtype)


@pytest.mark.parametrize("shard", ["20KB", "50GB"], ids=["sharded", "single"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("family", FAMILIES)
def test_transformers_to_maestrale_and_back(family, dtype, shard, tmp_path):
    ref, ours = model_pair(family, **FAMILIES[family])
    ref.to(dtype).save_pretrained(tmp_path / "hf", max_shard_size=shard)
    assert (tmp_path / "hf" / "model.safetensors.index.json").exists() == (shard == "20KB")
    # The same weights built in `dtype` by each library: buffers such as rotary frequencies stay float32.
    twin = type(ours).from_config(ours.config, dtype=dtype, attn_implementation="eager").eval()
    twin.load_state_dict(ours.state_dict())
    ref_loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", attn_implementation="eager")

    loaded = maestrale.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", attn_implementation="eager")
    assert type(loaded) is type(ours) and loaded.dtype == dtype and not loaded.training
    state = loaded.state_dict()
    for name, tensor in ref_loaded.state_dict().items():
        assert torch.equal(state[name], tensor), name
    assert torch.equal(logits(loaded), logits(twin))

    loaded.save_pretrained(tmp_path / "ours", max_shard_size=shard)
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ours", attn_implementation="eager")
    assert back.dtype == dtype
    assert torch.equal(logits(back), logits(ref_loaded))
    saved = json.loads((tmp_path / "ours" / "config.json").read_text())
    assert saved["architectures"] == [type(ours).__name__] and saved["dtype"] == str(dtype).removeprefix("torch.")


def test_saved_files_match_transformers_layout(tmp_path):
    """Mixtral experts are written one by one (as transformers writes them); tied heads are not written."""
    _, ours = model_pair("mixtral", num_local_experts=2, tie_word_embeddings=True)
    ours.save_pretrained(tmp_path, max_shard_size="30KB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    names = set(index["weight_map"])
    assert "model.layers.0.block_sparse_moe.experts.1.w3.weight" in names
    assert "model.layers.0.block_sparse_moe.gate.weight" in names
    assert not any("gate_up_proj" in n for n in names) and "lm_head.weight" not in names
    assert index["metadata"]["total_size"] == sum(p.numel() * 4 for p in ours.parameters())
    generation = json.loads((tmp_path / "generation_config.json").read_text())
    assert generation["bos_token_id"] == 1 and generation["eos_token_id"] == 2
    assert transformers.GenerationConfig.from_pretrained(tmp_path).eos_token_id == 2


def test_tied_embeddings_round_trip(tmp_path):
    ref, ours = model_pair("mistral", tie_word_embeddings=True)
    ref.save_pretrained(tmp_path)
    loaded = maestrale.MistralForCausalLM.from_pretrained(tmp_path, attn_implementation="eager")
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    assert torch.equal(logits(loaded), logits(ours))


def test_bin_checkpoint(tmp_path):
    ref, ours = model_pair("phi3")
    ref.config.save_pretrained(tmp_path)
    torch.save(ref.state_dict(), tmp_path / "pytorch_model.bin")
    assert torch.equal(logits(maestrale.Phi3ForCausalLM.from_pretrained(tmp_path, attn_implementation="eager")), logits(ours))


def test_new_head_is_initialised_and_named_once(tmp_path, caplog):
    ref, ours = model_pair("mistral")
    ref.save_pretrained(tmp_path)
    with caplog.at_level(logging.WARNING, logger="maestrale.loading"):
        model, info = maestrale.AutoModelForSequenceClassification.from_pretrained(
            tmp_path, num_labels=3, output_loading_info=True)
    assert info["missing_keys"] == ["score.weight"] and info["unexpected_keys"] == ["lm_head.weight"]
    fresh = [r.message for r in caplog.records if "newly initialised" in r.message]
    assert len(fresh) == 1 and "score.weight" in fresh[0]
    assert model.score.weight.shape == (3, 32) and 0.0 < model.score.weight.std() < 0.1  # drawn, not garbage
    assert torch.equal(model.model.embed_tokens.weight, ours.model.embed_tokens.weight)


def test_base_model_from_task_checkpoint_and_back(tmp_path):
    ref, ours = model_pair("mistral")
    ref.save_pretrained(tmp_path / "lm")
    base = maestrale.MistralModel.from_pretrained(tmp_path / "lm", attn_implementation="eager")
    with torch.no_grad():
        assert torch.equal(base(IDS).last_hidden_state, ours.model(IDS).last_hidden_state)
    base.save_pretrained(tmp_path / "base")
    lm, info = maestrale.MistralForCausalLM.from_pretrained(tmp_path / "base", output_loading_info=True)
    assert info["missing_keys"] == ["lm_head.weight"] and info["unexpected_keys"] == []


def test_options(tmp_path):
    ref, ours = model_pair("mistral")
    ref.save_pretrained(tmp_path)
    half = maestrale.AutoModelForCausalLM.from_pretrained(tmp_path, torch_dtype="bfloat16", device_map="cpu")
    assert half.dtype == torch.bfloat16 and half.config.dtype == torch.bfloat16
    assert half.model.rotary_emb.inv_freq.dtype == torch.float32  # buffers are computed, not loaded
    assert torch.equal(half.model.rotary_emb.inv_freq, ours.model.rotary_emb.inv_freq)
    model = maestrale.AutoModelForCausalLM.from_pretrained(
        tmp_path, dtype="auto", device_map={"model": "cpu", "lm_head": torch.device("cpu")},
        attn_implementation="sdpa", sliding_window=3)
    assert model.dtype == torch.float32 and model.config.sliding_window == 3
    assert model.config._attn_implementation == "sdpa"
    assert maestrale.AutoModelForCausalLM.from_pretrained(tmp_path, device_map="auto").device.type in ("cpu", "cuda")
    with pytest.raises(TypeError, match="not_a_field"):
        maestrale.AutoModelForCausalLM.from_pretrained(tmp_path, not_a_field=1)
    with pytest.raises(ValueError, match="model.nowhere"):
        maestrale.AutoModelForCausalLM.from_pretrained(tmp_path, device_map={"model.nowhere": "cpu"})
    with pytest.raises(ValueError, match="holds a .mistral. model, which Phi3ForCausalLM cannot load"):
        maestrale.Phi3ForCausalLM.from_pretrained(tmp_path)


def test_save_into_existing_folder_keeps_other_files(tmp_path):
    _, ours = model_pair("mistral")
    ours.save_pretrained(tmp_path, max_shard_size="20KB")
    (tmp_path / "tokenizer.json").write_text("{}")
    ours.save_pretrained(tmp_path)  # now one file: the old shards and index must go
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "generation_config.json",
                                                          "model.safetensors", "tokenizer.json"]
    assert not list(tmp_path.parent.glob(f".{tmp_path.name}.*"))
