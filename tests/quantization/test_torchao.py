"""TorchAoConfig: small random models quantized on load by maestrale and by transformers + torchao (on CPU) with the
same config give the same layers and logits; the config's dict, dequantize(), save and the refusals."""

import sys

import pytest
import torch

from parity import model_pair

import maestrale

torchao = pytest.importorskip("torchao", reason="torchao is not installed (test extra)")
from torchao.prototype.quantization.int4.inference_workflow import PrototypeInt4WeightOnlyConfig  # noqa: E402
from torchao.quantization import Int4WeightOnlyConfig, Int8WeightOnlyConfig  # noqa: E402
from torchao.quantization.quantize_.workflows import Int4ChooseQParamsAlgorithm  # noqa: E402

# hidden 128 and intermediate 256 take every group size; vocabulary and layers stay small
SIZES = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, vocab_size=97)
FAMILIES = {"mistral": {}, "phi3": {}, "mixtral": {"num_local_experts": 4, "num_experts_per_tok": 2}}
PROMPT = torch.tensor([[1, 5, 9, 33, 2, 17, 40], [3, 3, 8, 60, 11, 12, 95]])


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    folders = {}

    def get(family: str, **overrides):
        key = (family, tuple(sorted(overrides.items())))
        if key not in folders:
            ref, _ = model_pair(family, **{**SIZES, **FAMILIES[family], **overrides})
            folders[key] = tmp_path_factory.mktemp(family)
            ref.save_pretrained(folders[key])
        return folders[key]

    return get


def load_both(path, quant_type, dtype=torch.float32, **options):
    """(transformers model, maestrale model) quantized on load with the same TorchAoConfig. transformers + torchao
    run int4 on CPU only through PrototypeInt4WeightOnlyConfig, the same quantization as Int4WeightOnlyConfig."""
    import transformers

    theirs = quant_type
    if isinstance(quant_type, Int4WeightOnlyConfig):
        theirs = PrototypeInt4WeightOnlyConfig(group_size=quant_type.group_size,
                                               int4_choose_qparams_algorithm=quant_type.int4_choose_qparams_algorithm)
    ref = transformers.AutoModelForCausalLM.from_pretrained(
        path, dtype=dtype, quantization_config=transformers.TorchAoConfig(theirs, **options))
    ours = maestrale.AutoModelForCausalLM.from_pretrained(
        path, dtype=dtype, quantization_config=maestrale.TorchAoConfig(quant_type, **options))
    return ref.eval(), ours


def quantized(model) -> set[str]:
    """Names of the modules whose weight is quantized (a torchao tensor or a maestrale packed weight)."""
    return {name for name, m in model.named_modules()
            if type(getattr(m, "weight", None)).__name__ in ("Int8Tensor", "Int4OpaqueTensor", "Int8Weight",
                                                              "Int4Weight")}


HQQ = Int4ChooseQParamsAlgorithm.HQQ
CONFIGS = {"int8": Int8WeightOnlyConfig(), "int4-g32": Int4WeightOnlyConfig(group_size=32),
           "int4-g128": Int4WeightOnlyConfig(group_size=128),
           "int4-g64-hqq": Int4WeightOnlyConfig(group_size=64, int4_choose_qparams_algorithm=HQQ)}


@pytest.mark.parametrize("config", CONFIGS, ids=str)
@pytest.mark.parametrize("family", FAMILIES)
def test_logits_equal_transformers_with_torchao(folder, family, config):
    ref, ours = load_both(folder(family), CONFIGS[config])
    assert quantized(ours) == quantized(ref) and len(quantized(ours)) >= 4 * SIZES["num_hidden_layers"]
    with torch.no_grad():
        expected, got = ref(PROMPT).logits, ours(PROMPT).logits
    # int4: the same kernel on the same values; int8: torch's int8 product rounds once where torchao's rounds twice
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5 * expected.abs().max().item())


def test_bfloat16_int4_equals_transformers(folder):
    ref, ours = load_both(folder("mistral"), Int4WeightOnlyConfig(group_size=64), dtype=torch.bfloat16)
    with torch.no_grad():
        assert torch.equal(ours(PROMPT).logits, ref(PROMPT).logits)


def test_layers_torchao_leaves_in_float(folder):
    path = folder("mistral", hidden_size=96, vocab_size=96)  # torchao packs whole tiles of 16 rows only
    # modules_to_not_convert replaces the default (the head) by its own list (a regex: transformers matches the
    # patterns against weight names, so a bare suffix such as "o_proj" would match nothing there)
    ref, ours = load_both(path, Int4WeightOnlyConfig(group_size=32), modules_to_not_convert=[r".*\.o_proj"])
    names = quantized(ours)
    assert names == quantized(ref) and "lm_head" in names and not any(name.endswith("o_proj") for name in names)
    # inputs of 96 are not whole groups of 64: torchao leaves those layers in float
    ref, ours = load_both(path, Int4WeightOnlyConfig(group_size=64))
    assert quantized(ours) == quantized(ref) == {f"model.layers.{i}.mlp.down_proj" for i in range(2)}
    with torch.no_grad():
        torch.testing.assert_close(ours(PROMPT).logits, ref(PROMPT).logits, rtol=0, atol=1e-5)


def test_quantized_model_equals_its_dequantized_model_and_saves_after(folder, tmp_path):
    ours = maestrale.AutoModelForCausalLM.from_pretrained(
        folder("phi3"), quantization_config=maestrale.TorchAoConfig(Int4WeightOnlyConfig(group_size=32)))
    assert ours.is_quantized
    with torch.no_grad():
        logits = ours(PROMPT).logits
        out = ours.generate(PROMPT[:1], max_new_tokens=6, do_sample=False)
        # the engine's static decoder runs the quantized layers as modules
        assert torch.equal(out, ours.generate(PROMPT[:1], max_new_tokens=6, do_sample=False,
                                              cache_implementation="static"))
    with pytest.raises(ValueError, match=r"kept quantized \(int4 g32\).*dequantize"):
        ours.save_pretrained(tmp_path / "quantized")
    ours.dequantize()
    assert not ours.is_quantized and not quantized(ours)
    with torch.no_grad():
        torch.testing.assert_close(ours(PROMPT).logits, logits, rtol=0, atol=1e-5 * logits.abs().max().item())
    ours.save_pretrained(tmp_path / "float")
    assert "quantization_config" not in (tmp_path / "float" / "config.json").read_text()


def test_config_dict_is_transformers(folder):
    import transformers

    for quant_type in (Int8WeightOnlyConfig(), Int4WeightOnlyConfig(group_size=64)):
        theirs = transformers.TorchAoConfig(quant_type, modules_to_not_convert=["lm_head"]).to_dict()
        ours = maestrale.TorchAoConfig(quant_type, modules_to_not_convert=["lm_head"])
        assert ours.to_dict() == theirs
        again = maestrale.TorchAoConfig.from_dict(theirs)
        assert again.to_dict() == theirs and again.quant_type == quant_type
    # a dict in place of the object, as transformers accepts it
    model = maestrale.AutoModelForCausalLM.from_pretrained(folder("mistral"), quantization_config=theirs)
    assert isinstance(model.config.quantization_config, maestrale.TorchAoConfig)
    assert model.config.to_dict()["quantization_config"] == theirs


def test_refusals_name_the_option():
    from torchao.quantization import Float8WeightOnlyConfig, PerTensor

    with pytest.raises(ValueError, match="string quant_type 'int4_weight_only'.*Int4WeightOnlyConfig"):
        maestrale.TorchAoConfig("int4_weight_only")
    with pytest.raises(ValueError, match="Float8WeightOnlyConfig is not supported"):
        maestrale.TorchAoConfig(Float8WeightOnlyConfig())
    with pytest.raises(ValueError, match=r"Int4WeightOnlyConfig\(group_size=48\).*32, 64, 128, 256"):
        maestrale.TorchAoConfig(Int4WeightOnlyConfig(group_size=48))
    with pytest.raises(ValueError, match=r"granularity=PerTensor\(\)"):
        maestrale.TorchAoConfig(Int8WeightOnlyConfig(granularity=PerTensor()))
    with pytest.raises(ValueError, match="include_input_output_embeddings=True"):
        maestrale.TorchAoConfig(Int8WeightOnlyConfig(), include_input_output_embeddings=True)
    with pytest.raises(TypeError, match="torchao config object"):
        maestrale.TorchAoConfig({"group_size": 32})


def test_modules_to_not_convert_must_match_a_module(folder):
    config = maestrale.TorchAoConfig(Int8WeightOnlyConfig(), modules_to_not_convert=["no_such_proj"])
    with pytest.raises(ValueError, match="modules_to_not_convert names 'no_such_proj'"):
        maestrale.AutoModelForCausalLM.from_pretrained(folder("mistral"), quantization_config=config)


def test_a_saved_config_without_torchao_asks_for_it(monkeypatch):
    import transformers

    saved = transformers.TorchAoConfig(Int8WeightOnlyConfig()).to_dict()
    monkeypatch.setitem(sys.modules, "torchao.core.config", None)  # as if torchao were not installed
    with pytest.raises(ImportError, match=r"pip install 'maestrale\[torchao\]'"):
        maestrale.TorchAoConfig.from_dict(saved)


def test_a_checkpoint_saved_quantized_by_torchao_is_refused(folder, tmp_path):
    import json
    import shutil

    import transformers

    shutil.copytree(folder("mistral"), tmp_path, dirs_exist_ok=True)
    data = json.loads((tmp_path / "config.json").read_text())
    data["quantization_config"] = transformers.TorchAoConfig(Int8WeightOnlyConfig()).to_dict()
    (tmp_path / "config.json").write_text(json.dumps(data))
    with pytest.raises(NotImplementedError, match=r"quantized with torchao .* quantization_config=TorchAoConfig"):
        maestrale.AutoModelForCausalLM.from_pretrained(tmp_path)


def test_static_decoder_stacks_int8_layers(folder):
    """The decode step runs q/k/v and gate/up of an int8 model as one product each, with the tokens and logits of
    the reference path."""
    from maestrale.quantization.weight_only import Int8Weight

    ours = maestrale.AutoModelForCausalLM.from_pretrained(
        folder("mistral"), quantization_config=maestrale.TorchAoConfig(Int8WeightOnlyConfig()))
    kwargs = dict(max_new_tokens=6, do_sample=False, return_dict_in_generate=True, output_logits=True)
    with torch.no_grad():
        ref = ours.generate(PROMPT[:1], cache_implementation="dynamic", **kwargs)
        fast = ours.generate(PROMPT[:1], cache_implementation="static", **kwargs)
    layer = ours.__dict__["_static_decoder"].layers[0]
    assert isinstance(layer.qkv, Int8Weight) and layer.qkv.shape == (128 + 2 * 64, 128)
    assert isinstance(layer.gate_up, Int8Weight) and layer.gate_up.shape == (512, 128)
    assert torch.equal(ref.sequences, fast.sequences)
    for a, b in zip(ref.logits, fast.logits):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)


EXPERTS_KEY = r"re:.*\.experts"


def per_layer(rule, **more):
    from torchao.quantization import FqnToConfig

    return maestrale.TorchAoConfig(FqnToConfig({"_default": rule, EXPERTS_KEY: rule, **more}))


def fused_checkpoint(folder, tmp_path):
    """The checkpoint of `folder` with each layer's experts as the two 3-D tensors the model holds (gate_up_proj,
    down_proj), as some converters write them, in place of transformers' one tensor an expert."""
    import shutil

    from safetensors.torch import save_file

    model = maestrale.AutoModelForCausalLM.from_pretrained(folder)
    shutil.copy(folder / "config.json", tmp_path / "config.json")
    state = {name: t.contiguous() for name, t in model.state_dict().items() if name != "lm_head.weight"
             or not model.config.tie_word_embeddings}
    save_file(state, tmp_path / "model.safetensors")
    assert any(name.endswith("experts.gate_up_proj") for name in state)
    return tmp_path


@pytest.mark.parametrize("layout", ["one tensor an expert", "3-D"])
@pytest.mark.parametrize("config", ["int8", "int4-g32", "int4-g64-hqq"])
def test_fqn_to_config_quantizes_stacked_experts(folder, tmp_path, config, layout):
    """FqnToConfig reaches Mixtral's stacked experts: each expert's weights are quantized as torchao quantizes a
    weight (maestrale's quantize_int8 / quantize_int4, equal to torchao's), from either checkpoint layout; the
    logits equal those of the dequantized model, and the static decoder gives the dynamic path's tokens."""
    from maestrale.quantization.weight_only import QuantizedExperts, quantize_int4, quantize_int8

    path = folder("mixtral") if layout != "3-D" else fused_checkpoint(folder("mixtral"), tmp_path)
    rule = CONFIGS[config]
    ours = maestrale.AutoModelForCausalLM.from_pretrained(path, quantization_config=per_layer(rule))
    plain = maestrale.AutoModelForCausalLM.from_pretrained(path)
    group = getattr(rule, "group_size", None)
    algorithm = "hqq" if "hqq" in config else "tinygemm"
    for layer, float_layer in zip(ours.model.layers, plain.model.layers):
        experts = layer.mlp.experts
        assert isinstance(experts, QuantizedExperts) and len(experts.gate_up_proj) == 4
        for piece in ("gate_up_proj", "down_proj"):
            for held, weight in zip(getattr(experts, piece), getattr(float_layer.mlp.experts, piece).detach()):
                expected = quantize_int8(weight) if group is None else quantize_int4(weight, group, algorithm)
                assert held.kind == (f"int4 g{group}" + (" hqq" if algorithm == "hqq" else "") if group else "int8")
                for name, buffer in expected.named_buffers():
                    assert torch.equal(held.get_buffer(name), buffer), (piece, name)
    kwargs = dict(max_new_tokens=6, do_sample=False)
    with torch.no_grad():
        logits = ours(PROMPT).logits
        tokens = ours.generate(PROMPT[:1], **kwargs)
        assert torch.equal(ours.generate(PROMPT[:1], cache_implementation="static", **kwargs), tokens)
    ours.dequantize()
    assert not quantized(ours) and type(ours.model.layers[0].mlp.experts).__name__ == "Experts"
    with torch.no_grad():
        torch.testing.assert_close(ours(PROMPT).logits, logits, rtol=0, atol=1e-5 * logits.abs().max().item())


def test_int8_experts_equal_transformers_torchao(folder):
    """With the same FqnToConfig, transformers + torchao hold each layer's experts as a 3-D Int8Tensor (its Mixtral
    forward cannot run it on CPU: torchao lacks the transpose its grouped product takes); maestrale holds the same
    values and scales, an expert at a time."""
    import transformers
    from torchao.quantization import FqnToConfig

    config = FqnToConfig({"_default": Int8WeightOnlyConfig(), EXPERTS_KEY: Int8WeightOnlyConfig()})
    ref = transformers.AutoModelForCausalLM.from_pretrained(
        folder("mixtral"), quantization_config=transformers.TorchAoConfig(config))
    ours = maestrale.AutoModelForCausalLM.from_pretrained(folder("mixtral"),
                                                          quantization_config=maestrale.TorchAoConfig(config))
    assert quantized(ours) == quantized(ref)
    for theirs, mine in zip(ref.model.layers, ours.model.layers):
        for piece in ("gate_up_proj", "down_proj"):
            tensor = getattr(theirs.mlp.experts, piece)
            assert type(tensor).__name__ == "Int8Tensor" and tensor.qdata.dim() == 3
            for e, held in enumerate(getattr(mine.mlp.experts, piece)):
                assert torch.equal(held.values, tensor.qdata[e])
                assert torch.equal(held.scales, tensor.scale[e].to(held.scales.dtype))


def test_fqn_to_config_resolves_as_transformers():
    """A parameter's name, then its module's, then the first regex matching either, then "_default" (linear layers
    only); None leaves a weight in float."""
    from torchao.quantization import FqnToConfig

    int4, int8 = Int4WeightOnlyConfig(group_size=32), Int8WeightOnlyConfig()
    config = maestrale.TorchAoConfig(FqnToConfig({
        "model.layers.0.self_attn.q_proj.weight": int8, "model.layers.1.self_attn.q_proj": None,
        r"re:.*\.q_proj": int4, r"re:model\.layers\.0\..*": None, "_default": int8}))
    assert config.weight_config("model.layers.0.self_attn.q_proj.weight", True) is int8
    assert config.weight_config("model.layers.1.self_attn.q_proj.weight", True) is None
    assert config.weight_config("model.layers.2.self_attn.q_proj.weight", True) is int4
    assert config.weight_config("model.layers.0.mlp.down_proj.weight", True) is None
    assert config.weight_config("model.layers.2.mlp.down_proj.weight", True) is int8
    assert config.weight_config("model.layers.2.mlp.experts.gate_up_proj", False) is None  # "_default": linears
    assert maestrale.TorchAoConfig(int4).weight_config("model.layers.2.mlp.experts.down_proj", False) is None


def test_fqn_to_config_refusals_name_the_entry(folder):
    from torchao.quantization import FqnToConfig, Float8WeightOnlyConfig

    with pytest.raises(ValueError, match=r"FqnToConfig\['re:.\*experts'\] = quant_type Float8WeightOnlyConfig"):
        maestrale.TorchAoConfig(FqnToConfig({"re:.*experts": Float8WeightOnlyConfig()}))
    with pytest.raises(ValueError, match=r"FqnToConfig key 're:\(' is not a regular expression"):
        maestrale.TorchAoConfig(FqnToConfig({"re:(": Int8WeightOnlyConfig()}))
    with pytest.raises(ValueError, match=r"FqnToConfig\['lm_head'\] = Int4WeightOnlyConfig\(group_size=48\)"):
        maestrale.TorchAoConfig(FqnToConfig({"lm_head": Int4WeightOnlyConfig(group_size=48)}))
    half = maestrale.TorchAoConfig(FqnToConfig({r"re:.*\.experts\.gate_up_proj": Int8WeightOnlyConfig()}))
    with pytest.raises(NotImplementedError, match=r"leaves model\.layers\.0\.mlp\.experts\.down_proj in float"):
        maestrale.AutoModelForCausalLM.from_pretrained(folder("mixtral"), quantization_config=half)
    # a dict round trip, as config.json holds it
    config = per_layer(Int4WeightOnlyConfig(group_size=64))
    assert maestrale.TorchAoConfig.from_dict(config.to_dict()).to_dict() == config.to_dict()


def test_experts_in_two_layouts_at_once_are_refused(folder, tmp_path):
    """A checkpoint holding one expert both inside the 3-D tensor and as a tensor of its own: an error naming the
    weight, not an expert quantized from half-written rows."""
    from safetensors.torch import load_file, save_file

    path = fused_checkpoint(folder("mixtral"), tmp_path)
    state = load_file(path / "model.safetensors")
    hub = load_file(folder("mixtral") / "model.safetensors")
    extra = "model.layers.0.block_sparse_moe.experts.1.w1.weight"
    save_file({**state, extra: hub[extra]}, path / "model.safetensors")
    with pytest.raises(ValueError, match=r"model\.layers\.0\.mlp\.experts\.gate_up_proj .*twice"):
        maestrale.AutoModelForCausalLM.from_pretrained(path, quantization_config=per_layer(Int8WeightOnlyConfig()))
