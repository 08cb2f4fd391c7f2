"""Where the weights live: building a model without allocating its weights, then placing them per `device_map`."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from .sizes import parse_size

DeviceMap = dict[str, torch.device]
RANDOM_INITIALISERS = ("normal_", "uniform_", "kaiming_uniform_", "kaiming_normal_", "trunc_normal_")


@contextlib.contextmanager
def parameters_on_meta() -> Iterator[None]:
    """Build modules whose parameters sit on the meta device: no memory and no random init for weights that the
    checkpoint overwrites anyway. Buffers (rotary frequencies) are computed for real, since no checkpoint holds them.

    torch's layers initialise themselves through torch.nn.init, whose random functions are skipped here: on meta
    tensors they would do nothing but import torch._dynamo (over a second) on first use."""
    register = nn.Module.register_parameter
    initialisers = {name: getattr(nn.init, name) for name in RANDOM_INITIALISERS}

    def register_on_meta(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        register(module, name, param)
        if param is not None and not param.is_meta:
            module._parameters[name] = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)

    def skip_on_meta(initialise):
        return lambda tensor, *args, **kwargs: tensor if tensor.is_meta else initialise(tensor, *args, **kwargs)

    nn.Module.register_parameter = register_on_meta
    for name, initialise in initialisers.items():
        setattr(nn.init, name, skip_on_meta(initialise))
    try:
        yield
    finally:
        nn.Module.register_parameter = register
        for name, initialise in initialisers.items():
            setattr(nn.init, name, initialise)


def resolve_device_map(device_map, model: nn.Module, max_memory: dict | None) -> DeviceMap:
    """{module prefix: device} from None, a device ("cpu", "cuda:1", 0, torch.device), "auto" or a dict."""
    if device_map is None:
        return {"": torch.device("cpu")}
    if device_map == "auto":
        return _plan_auto(model, max_memory or {})
    if isinstance(device_map, dict):
        modules = dict(model.named_modules())
        unknown = [prefix for prefix in device_map if prefix not in modules]
        if unknown:
            raise ValueError(f"device_map names modules this model does not have: {unknown}; "
                             f"use prefixes such as 'model.embed_tokens', 'model.layers.0', 'lm_head'")
        resolved = {prefix: _device(d) for prefix, d in device_map.items()}
        uncovered = [name for name, _ in model.named_parameters() if device_for(resolved, name) is None]
        if uncovered:
            raise ValueError(f"device_map leaves {len(uncovered)} weights without a device, e.g. {uncovered[:3]}; "
                             "add their modules to it (or a '' entry as the default)")
        return resolved
    return {"": _device(device_map)}


def device_for(device_map: DeviceMap, name: str) -> torch.device | None:
    """The device of the longest prefix of `name` in the map."""
    parts = name.split(".")
    for end in range(len(parts), -1, -1):
        prefix = ".".join(parts[:end])
        if prefix in device_map:
            return device_map[prefix]
    return None


def _device(spec) -> torch.device:
    try:
        device = torch.device(f"cuda:{spec}" if isinstance(spec, int) else spec)
    except (RuntimeError, TypeError):
        raise ValueError(f"device_map: {spec!r} is not a device; use 'cpu', 'cuda', 'cuda:N', 'auto' or a dict") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device_map asks for {device} but torch sees no CUDA GPU; use device_map='cpu'")
        if (device.index or 0) >= torch.cuda.device_count():
            raise ValueError(f"device_map asks for {device} but only {torch.cuda.device_count()} GPU(s) are visible")
    return device


def _plan_auto(model: nn.Module, max_memory: dict) -> DeviceMap:
    """Fill the GPUs in order, block by block (embeddings, each layer, final norm, head), then the CPU.

    Budgets come from `max_memory` ({0: "20GiB", "cpu": "60GiB"}), else 90% of each GPU's free memory.
    """
    budgets: list[tuple[torch.device, float]] = []
    for i in range(torch.cuda.device_count() if torch.cuda.is_available() else 0):
        default = torch.cuda.mem_get_info(i)[0] * 0.9
        budgets.append((torch.device("cuda", i), parse_size(max_memory.get(i, max_memory.get(f"cuda:{i}", default)))))
    budgets.append((torch.device("cpu"), parse_size(max_memory.get("cpu", float("inf")))))

    plan: DeviceMap = {}
    slot, used, seen = 0, 0.0, set()
    for prefix, module in _blocks(model):
        size = sum(p.numel() * p.element_size() for p in module.parameters() if id(p) not in seen)
        seen.update(id(p) for p in module.parameters())
        while used + size > budgets[slot][1] and slot < len(budgets) - 1:
            slot, used = slot + 1, 0.0
        if used + size > budgets[slot][1]:
            raise ValueError(f"device_map='auto': the model does not fit in max_memory={max_memory} "
                             f"(stuck at {prefix!r}); raise the limits")
        plan[prefix] = budgets[slot][0]
        used += size
    return plan


def _blocks(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """Units that are placed whole: embeddings, each decoder layer, the final norm, the head."""
    for name, child in model.named_children():
        if isinstance(child, nn.ModuleList):
            yield from ((f"{name}.{i}", layer) for i, layer in enumerate(child))
        elif child is model.base_model:  # a task model: open up its decoder
            yield from ((f"{name}.{sub}", module) for sub, module in _blocks(child))
        else:
            yield name, child


def materialize(model: nn.Module, device_map: DeviceMap) -> None:
    """Give every meta parameter uninitialised storage on its device (tied parameters stay one tensor), and move
    buffers to their module's device."""
    fresh: dict[int, nn.Parameter] = {}
    for module_name, module in model.named_modules():
        for name, param in module._parameters.items():
            if param is None:
                continue
            if id(param) not in fresh:
                device = device_for(device_map, f"{module_name}.{name}".lstrip("."))
                # torch.empty, not empty_like: from a meta tensor empty_like takes ~1 ms a call
                fresh[id(param)] = nn.Parameter(torch.empty(param.shape, dtype=param.dtype, device=device),
                                                requires_grad=param.requires_grad)
            module._parameters[name] = fresh[id(param)]
        for name, buffer in module._buffers.items():
            if buffer is not None:
                module._buffers[name] = buffer.to(device_for(device_map, f"{module_name}.{name}".lstrip(".")))


def add_device_hooks(model: nn.Module, device_map: DeviceMap) -> None:
    """With weights on several devices, move each placed module's tensor inputs to where its weights are."""
    if len(set(device_map.values())) < 2:
        return
    for prefix in device_map:
        if prefix:
            module = model.get_submodule(prefix)
            weights = next(iter(module.parameters()), None)
            device = weights.device if weights is not None else device_map[prefix]
            module.register_forward_pre_hook(_mover(device), with_kwargs=True)


def _mover(device: torch.device):
    def move(value):
        if isinstance(value, torch.Tensor):
            return value.to(device)
        if isinstance(value, (tuple, list)):
            return type(value)(move(v) for v in value)
        return value

    def hook(module, args, kwargs):
        return move(args), {k: move(v) for k, v in kwargs.items()}

    return hook
