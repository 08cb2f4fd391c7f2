"""`maestrale generate --load-in-4bit / --load-in-8bit`: the default model (SmolLM2 GGUF) loaded quantized."""

import pytest
import torch

from maestrale import cli


@pytest.mark.parametrize("flag, kind", [("--load-in-4bit", "Linear4bit"), ("--load-in-8bit", "Linear8bitLt")])
def test_generate_quantized(flag, kind, monkeypatch, capsys):
    loaded = {}

    def load(*args):
        loaded["model"], tokenizer = real_load(*args)
        return loaded["model"], tokenizer

    real_load = cli.load
    monkeypatch.setattr(cli, "load", load)
    assert cli.main(["generate", "The capital of France is", "--temperature", "0", "--max-new-tokens", "4", flag]) == 0
    model = loaded["model"]
    assert (model.is_loaded_in_4bit, model.is_loaded_in_8bit) == (flag == "--load-in-4bit", flag == "--load-in-8bit")
    assert sum(type(m).__name__ == kind for m in model.modules()) == 7 * model.config.num_hidden_layers
    if flag == "--load-in-4bit":
        layer = model.model.layers[0].self_attn.q_proj
        assert layer.weight.quant_type == "nf4" and layer.compute_dtype == torch.float32  # --dtype auto: the default
    assert capsys.readouterr().out.strip()


def test_both_flags_are_refused(capsys):
    with pytest.raises(SystemExit) as excinfo:
        cli.main(["generate", "hi", "--load-in-4bit", "--load-in-8bit"])
    assert excinfo.value.code == 2
    assert "not allowed with argument" in capsys.readouterr().err


def test_missing_bitsandbytes_is_one_line(monkeypatch, capsys):
    monkeypatch.setitem(__import__("sys").modules, "bitsandbytes", None)
    assert cli.main(["generate", "hi", "--load-in-4bit"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "pip install 'maestrale[bnb]'" in err
