"""Loading fills a meta-built model shard by shard: host memory peaks near one copy of the weights."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

import maestrale

MEASURE = """
import sys
import torch, maestrale

def peak_kib():  # VmHWM belongs to this process image; ru_maxrss would carry over the (large) parent's peak
    return int(next(line for line in open("/proc/self/status") if line.startswith("VmHWM")).split()[1])

torch.empty(1, device="meta").normal_()  # torch imports its meta kernels (~75 MB, sympy included) on first use
before = peak_kib()  # the interpreter + torch + maestrale baseline
model = maestrale.AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.bfloat16)
after = peak_kib()
assert model.dtype == torch.bfloat16 and model.model.layers[-1].mlp.down_proj.weight.abs().sum() > 0
print((after - before) * 1024)
"""


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads peak memory from /proc")
def test_peak_host_memory_of_a_bf16_load(tmp_path):
    config = maestrale.MistralConfig(vocab_size=8000, hidden_size=1024, intermediate_size=4096, num_hidden_layers=10,
                                     num_attention_heads=16, num_key_value_heads=4)
    model = maestrale.MistralForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(tmp_path, max_shard_size="100MB")
    del model
    size = sum(p.stat().st_size for p in tmp_path.glob("*.safetensors"))
    assert len(list(tmp_path.glob("*.safetensors"))) > 2 and size > 300e6

    out = subprocess.run([sys.executable, "-c", MEASURE, str(tmp_path)], capture_output=True, text=True, check=True)
    ratio = int(out.stdout.split()[-1]) / size
    print(f"peak host memory while loading: {ratio:.3f} x the checkpoint ({size / 1e6:.0f} MB)")
    assert ratio < 1.3
