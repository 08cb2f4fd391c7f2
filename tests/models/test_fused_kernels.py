"""The forward's fused element-wise kernels (models/kernels.py) against the eager chains they replace, and a model's
forward with them against the same forward without them.

Runs on CUDA, or on CPU under Triton's interpreter (TRITON_INTERPRET=1 with triton installed); skipped otherwise.
"""

import pytest
import torch
import torch.nn.functional as F

from maestrale.models import kernels
from maestrale.models.rotary import _rotate_half

if torch.cuda.is_available() and kernels.triton is not None:
    DEVICE, DTYPES = "cuda", [torch.float16, torch.bfloat16]
elif kernels.use_triton(torch.empty(0)):
    DEVICE, DTYPES = "cpu", [torch.float16]  # the interpreter truncates to bfloat16 instead of rounding
else:
    pytest.skip("the Triton kernels need CUDA, or TRITON_INTERPRET=1 with triton installed", allow_module_level=True)


def ulps(out: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """How many representable steps of the dtype apart each pair is (same-sign values; exact zeros count 0)."""
    bits = {torch.float16: torch.int16, torch.bfloat16: torch.int16}[out.dtype]
    return (out.view(bits).int() - ref.view(bits).int()).abs()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hidden", [200, 576])
def test_rms_norm_equals_eager_chain(dtype, hidden):
    x = (torch.randn(3, 37, hidden, device=DEVICE) * 3).to(dtype)
    weight = torch.randn(hidden, device=DEVICE).to(dtype)
    ref = weight * (x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + 1e-5)).to(dtype)
    out = kernels.rms_norm(x, weight, 1e-5)
    diff = ulps(out, ref)
    # the mean's sum runs in another order: a rare last-bit difference, never more
    assert diff.max() <= 1 and (diff > 0).float().mean() < 0.01


@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_gate_equals_eager_chain_on_fused_halves(dtype):
    gate, up = (torch.randn(2, 5, 2 * 1500, device=DEVICE) * 4).to(dtype).chunk(2, dim=-1)  # strided halves
    out = kernels.silu_gate(gate, up)
    diff = ulps(out, F.silu(gate) * up)
    assert diff.max() <= 2 and (diff > 0).float().mean() < 0.01  # silu's last bit may differ (exp), and so the product


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rot,cos_batch", [(64, 2), (32, 2), (64, 1)])  # full, partial (Phi-3 style), broadcast
def test_rotary_equals_eager_chain_in_the_inputs_layout(dtype, rot, cos_batch):
    b, s, heads, d = 2, 21, 3, 64
    x = torch.randn(b, s, heads, d, device=DEVICE).to(dtype).transpose(1, 2)  # the attention's layout
    freqs = torch.arange(s, device=DEVICE)[:, None].float() / 10000 ** (torch.arange(0, rot, 2, device=DEVICE) / rot)
    angles = torch.cat((freqs, freqs), dim=-1).expand(cos_batch, s, rot)
    cos, sin = angles.cos().to(dtype), angles.sin().to(dtype)
    c, sn = cos.unsqueeze(1), sin.unsqueeze(1)
    head, tail = x[..., :rot], x[..., rot:]
    ref = torch.cat((head * c + _rotate_half(head) * sn, tail), dim=-1)
    out = kernels.rotary(x, cos, sin)
    assert torch.equal(out, ref)
    assert out.stride() == x.stride()


@pytest.mark.parametrize("family", ["mistral", "phi3"])
def test_forward_with_kernels_equals_forward_without(family, monkeypatch):
    from maestrale import MistralConfig, MistralForCausalLM, Phi3Config, Phi3ForCausalLM

    shape = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2)
    torch.manual_seed(0)
    model = (MistralForCausalLM(MistralConfig(**shape)) if family == "mistral"
             else Phi3ForCausalLM(Phi3Config(**shape, pad_token_id=0))).to(DEVICE, DTYPES[0]).eval()
    ids = torch.randint(0, 128, (2, 19), device=DEVICE)
    calls = []
    for name in ("rms_norm", "silu_gate", "rotary"):
        kernel = getattr(kernels, name)
        monkeypatch.setattr(kernels, name, lambda *args, kernel=kernel, name=name: calls.append(name) or kernel(*args))
    with torch.no_grad():
        fused = model(ids).logits
        monkeypatch.setattr(kernels, "fused", lambda *tensors: False)
        eager = model(ids).logits
    assert sorted(set(calls)) == ["rms_norm", "rotary", "silu_gate"]
    assert (fused - eager).abs().max() <= 1e-2 * eager.abs().max()
