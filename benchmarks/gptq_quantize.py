"""Time GPTQConfig takes to quantize a model of real shape on this machine's GPU: random weights (as gpu.py builds
them), random calibration tokens, layer by layer as from_pretrained(..., quantization_config=GPTQConfig(...)) runs it.

    python3 benchmarks/gptq_quantize.py [--models mistral-7b phi3-mini-4k] [--pieces 8] [--seqlen 2048]
                                        [--group-size 128]

No other library is measured: transformers quantizes through GPTQModel, which is not installed beside it here.
"""

from __future__ import annotations

import argparse
import time
from types import SimpleNamespace

import torch

from gpu import MODELS, build


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    dense = [m for m in MODELS if "mixtral" not in m]  # Mixtral's experts are not linear layers: GPTQ leaves them
    parser.add_argument("--models", nargs="+", default=["mistral-7b"], choices=dense)
    parser.add_argument("--pieces", type=int, default=8, help="calibration pieces")
    parser.add_argument("--seqlen", type=int, default=2048, help="tokens a piece")
    parser.add_argument("--group-size", type=int, default=128)
    args = parser.parse_args()
    import maestrale
    from maestrale.quantization.gptq import quantize_gptq

    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, maestrale {maestrale.__version__}")
    for name in args.models:
        model = build(maestrale, name, 0)
        g = torch.Generator().manual_seed(0)
        tokens = iter(torch.randint(0, model.config.vocab_size, (args.pieces, args.seqlen), generator=g).tolist())
        config = maestrale.GPTQConfig(bits=4, group_size=args.group_size, dataset=[""] * args.pieces,
                                      tokenizer=lambda text: SimpleNamespace(input_ids=next(tokens)),
                                      model_seqlen=args.seqlen)
        torch.cuda.reset_peak_memory_stats()
        torch.cuda.synchronize()
        start = time.perf_counter()
        quantize_gptq(model, config)
        torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        layers = model.config.num_hidden_layers
        print(f"{name}: GPTQ g{args.group_size} of {layers} layers on {args.pieces} x {args.seqlen} tokens in "
              f"{seconds:.1f} s ({seconds / layers:.2f} s a layer), peak GPU memory "
              f"{torch.cuda.max_memory_allocated() / 2**30:.1f} GiB")
        del model
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
