"""Bad input fails with a message naming the file, tensor or option at fault, and leaves nothing half-written."""

import json
import os

import pytest
import torch

import maestrale
from parity import model_pair


@pytest.fixture
def saved(tmp_path):
    _, ours = model_pair("mistral")
    folder = tmp_path / "model"
    ours.save_pretrained(folder, max_shard_size="20KB")
    return folder


def first_shard(folder):
    return sorted(folder.glob("model-*.safetensors"))[0]


def test_truncated_safetensors(saved):
    shard = first_shard(saved)
    shard.write_bytes(shard.read_bytes()[:-100])
    with pytest.raises(OSError, match=rf"{shard.name} is not a valid safetensors file: tensor .* is truncated"):
        maestrale.AutoModelForCausalLM.from_pretrained(saved)


def test_corrupted_safetensors_header(saved):
    shard = first_shard(saved)
    data = bytearray(shard.read_bytes())
    data[10:20] = b"\xff" * 10
    shard.write_bytes(bytes(data))
    with pytest.raises(OSError, match=rf"{shard.name} is not a valid safetensors file: its header is not JSON"):
        maestrale.AutoModelForCausalLM.from_pretrained(saved)


def test_missing_shard(saved):
    shard = first_shard(saved)
    shard.unlink()
    with pytest.raises(FileNotFoundError, match=rf"index.json lists the shard '{shard.name}' but it is missing"):
        maestrale.AutoModelForCausalLM.from_pretrained(saved)


def test_config_disagreeing_with_weights(saved):
    config = json.loads((saved / "config.json").read_text())
    config["vocab_size"] = 120
    (saved / "config.json").write_text(json.dumps(config))
    with pytest.raises(RuntimeError, match=r"model.embed_tokens.weight: checkpoint \[97, 32\], model \[120, 32\]"):
        maestrale.AutoModelForCausalLM.from_pretrained(saved)
    model, info = maestrale.AutoModelForCausalLM.from_pretrained(saved, ignore_mismatched_sizes=True,
                                                                 output_loading_info=True)
    assert sorted(info["mismatched_keys"]) == [("lm_head.weight", (97, 32), (120, 32)),
                                               ("model.embed_tokens.weight", (97, 32), (120, 32))]
    assert model.lm_head.weight.shape == (120, 32) and model.lm_head.weight.abs().max() < 1  # freshly drawn


def test_unknown_model_type(saved):
    config = json.loads((saved / "config.json").read_text())
    config["model_type"] = "gpt_bigcode"
    (saved / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"config.json has model_type 'gpt_bigcode', which maestrale does not support"):
        maestrale.AutoModelForCausalLM.from_pretrained(saved)


class Payload:
    """Unpickling this would create a marker file."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.mknod if hasattr(os, "mknod") else open, (self.marker,))


def test_bin_with_code_is_refused_and_nothing_runs(saved, tmp_path):
    marker = tmp_path / "pwned"
    for shard in saved.glob("model*"):
        shard.unlink()
    torch.save({"model.norm.weight": torch.ones(32), "evil": Payload(str(marker))}, saved / "pytorch_model.bin")
    with pytest.raises(OSError, match=r"pytorch_model.bin was refused: its pickle holds more than tensors"):
        maestrale.AutoModelForCausalLM.from_pretrained(saved)
    assert not marker.exists()


def test_trust_remote_code_refused(saved):
    with pytest.raises(ValueError, match="maestrale never runs code from a checkpoint"):
        maestrale.AutoModelForCausalLM.from_pretrained(saved, trust_remote_code=True)


def test_hub_id_offline_says_so(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(OSError, match=r"the hub is unreachable .* point at a local folder"):
        maestrale.AutoModelForCausalLM.from_pretrained("mistralai/Mistral-7B-v0.1", cache_dir=tmp_path)


def test_cached_hub_id_loads_offline(saved, tmp_path, monkeypatch):
    """A hub repo in the huggingface_hub cache layout loads with HF_HUB_OFFLINE set and no network."""
    from huggingface_hub import constants

    commit = "0" * 40
    repo = tmp_path / "cache" / "models--someone--tiny-mistral"
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for file in saved.iterdir():
        (snapshot / file.name).write_bytes(file.read_bytes())
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    model = maestrale.AutoModelForCausalLM.from_pretrained("someone/tiny-mistral", cache_dir=tmp_path / "cache")
    reference = maestrale.AutoModelForCausalLM.from_pretrained(saved)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), reference.state_dict().values()))


def test_failed_save_leaves_nothing(tmp_path, monkeypatch):
    import maestrale.loading.save as save

    _, ours = model_pair("mistral")
    calls = []

    def failing_save_file(tensors, path, metadata=None):
        calls.append(path)
        if len(calls) == 3:
            raise OSError("disk full")
        torch.save(tensors, path)

    monkeypatch.setattr(save, "save_file", failing_save_file)
    with pytest.raises(OSError, match="disk full"):
        ours.save_pretrained(tmp_path / "out", max_shard_size="20KB")
    assert list(tmp_path.iterdir()) == []


def test_save_refuses_pickles(tmp_path):
    _, ours = model_pair("mistral")
    with pytest.raises(ValueError, match="safetensors only"):
        ours.save_pretrained(tmp_path, safe_serialization=False)


def test_folder_without_checkpoint(tmp_path):
    with pytest.raises(FileNotFoundError, match="no config.json .* no params.json"):
        maestrale.AutoModelForCausalLM.from_pretrained(tmp_path)
