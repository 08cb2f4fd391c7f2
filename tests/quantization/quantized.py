"""Helpers of the quantization tests: the families and options under test, loading with both libraries."""

import torch

FAMILIES = {"mistral": {}, "ministral": {"sliding_window": 8, "layer_types": ["sliding_attention", "full_attention",
                                                                              "sliding_attention"]},
            "mixtral": {"num_local_experts": 4, "num_experts_per_tok": 2}, "phi3": {}}
# The BitsAndBytesConfig options under test, keyed by a readable id.
OPTIONS = {
    "nf4": dict(load_in_4bit=True, bnb_4bit_quant_type="nf4"),
    "nf4-double": dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True),
    "fp4": dict(load_in_4bit=True, bnb_4bit_quant_type="fp4"),
    "fp4-double": dict(load_in_4bit=True, bnb_4bit_quant_type="fp4", bnb_4bit_use_double_quant=True),
    "int8": dict(load_in_8bit=True),
}
# hidden 64 (a multiple of bitsandbytes' 4-bit block of 64), so blocks and double quantization are exercised.
SIZES = dict(hidden_size=64, intermediate_size=128)


def load_both(folder, options, task="AutoModelForCausalLM", **kwargs):
    """(transformers model, maestrale model) loaded from `folder` with the same BitsAndBytesConfig."""
    import transformers

    import maestrale

    ref = getattr(transformers, task).from_pretrained(
        folder, quantization_config=transformers.BitsAndBytesConfig(**options), **kwargs)
    ours = getattr(maestrale, task).from_pretrained(
        folder, quantization_config=maestrale.BitsAndBytesConfig(**options), **kwargs)
    return ref.eval(), ours.eval()


def assert_same_state(ref, ours, fresh=()):
    """Same names, dtypes and bytes (packed weights and quant states included); `fresh`: prefixes of weights each
    library initialises randomly (a head the checkpoint lacks), left out: transformers leaves such a quantized
    layer's weight unquantized (float, no quant state), maestrale draws and quantizes it."""
    a, b = ({k: v for k, v in m.state_dict().items() if not k.startswith(tuple(fresh))} for m in (ref, ours))
    assert sorted(a) == sorted(b)
    for name in a:  # bytes: packed 4-bit weights stored as bfloat16 may read as NaN
        assert a[name].dtype == b[name].dtype and a[name].shape == b[name].shape, name
        assert torch.equal(a[name].reshape(-1).view(torch.uint8), b[name].reshape(-1).view(torch.uint8)), name


PROMPT = torch.tensor([[1, 5, 9, 33, 2, 17, 40], [3, 3, 8, 60, 11, 12, 95]])


def quantized_layers(model) -> dict[str, str]:
    """{module name: bitsandbytes class name} of a model's quantized layers."""
    return {name: type(m).__name__ for name, m in model.named_modules()
            if type(m).__name__ in ("Linear4bit", "Linear8bitLt")}
