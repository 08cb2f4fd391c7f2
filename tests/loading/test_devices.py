"""device_map on GPUs: one device, and a model split between a GPU and the CPU (inputs follow the weights)."""

import pytest
import torch

import maestrale
from parity import model_pair

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.parametrize("device_map", ["cuda", "auto", {"model.embed_tokens": "cpu", "model.layers.0": "cpu",
                                                         "model.layers.1": 0, "model.layers.2": "cpu",
                                                         "model.norm": "cuda:0", "model.rotary_emb": "cpu",
                                                         "lm_head": "cuda"}])
def test_device_map(device_map, tmp_path):
    _, ours = model_pair("mistral")
    ours.save_pretrained(tmp_path)
    model = maestrale.AutoModelForCausalLM.from_pretrained(tmp_path, device_map=device_map,
                                                           attn_implementation="eager")
    ids = torch.tensor([[5, 17, 3, 88, 41, 9]])
    with torch.no_grad():
        expected = ours(ids).logits
        got = model(ids.to(model.device)).logits
    assert got.device.type == "cuda"
    torch.testing.assert_close(got.cpu(), expected, rtol=1e-4, atol=1e-4)
    if isinstance(device_map, dict):
        assert model.model.layers[1].mlp.down_proj.weight.device.type == "cuda"
        assert model.model.layers[2].mlp.down_proj.weight.device.type == "cpu"
