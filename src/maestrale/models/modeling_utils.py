"""PreTrainedModel: what users rely on from any model object (config, device, embeddings, checkpointing, I/O)."""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn

from ..configs import PretrainedConfig
from .attention import check_attn_implementation
from .linear import Linear


class PreTrainedModel(nn.Module):
    config_class: type[PretrainedConfig] = PretrainedConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    supports_gradient_checkpointing = True
    # Output-embedding parameter name -> input-embedding parameter name, tied when config.tie_word_embeddings.
    _tied_weights_keys: dict[str, str] = {}

    def __init__(self, config: PretrainedConfig):
        super().__init__()
        if not isinstance(config, self.config_class):
            raise TypeError(f"{type(self).__name__} needs a {self.config_class.__name__}, got {type(config).__name__}")
        config._attn_implementation = check_attn_implementation(config._attn_implementation)
        self.config = config
        self.name_or_path = config.name_or_path  # from_pretrained sets it on the config before building the model

    def post_init(self) -> None:
        """Initialise weights as transformers does (meta parameters hold no values: loading fills them), then tie
        embeddings."""
        if not any(p.is_meta for p in self.parameters()):
            self.apply(self._init_weights)
        self.tie_weights()

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            module.weight.normal_(0.0, std)
            if module.bias is not None:
                module.bias.zero_()
        elif isinstance(module, nn.Embedding):
            module.weight.normal_(0.0, std)
            if module.padding_idx is not None:
                module.weight[module.padding_idx].zero_()
        else:
            for name, param in module.named_parameters(recurse=False):
                # RMSNorm scales start at one; router and expert tensors like linear weights.
                param.fill_(1.0) if name == "weight" and param.dim() == 1 else param.normal_(0.0, std)

    # ----- construction -----
    @classmethod
    def from_config(cls, config: PretrainedConfig, *, attn_implementation: str | None = None,
                    dtype: torch.dtype | str | None = None, torch_dtype: torch.dtype | str | None = None):
        """A randomly initialised model for `config`."""
        if attn_implementation is not None:
            config._attn_implementation = check_attn_implementation(attn_implementation)
        dtype = resolve_dtype(dtype if dtype is not None else torch_dtype)
        if dtype is None:
            return cls(config)
        previous = torch.get_default_dtype()
        torch.set_default_dtype(dtype)
        try:
            return cls(config)
        finally:
            torch.set_default_dtype(previous)

    _from_config = from_config

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, *model_args: Any, **kwargs: Any):
        """Load a checkpoint: a local folder, a hub id, a .gguf file or a Mistral native folder."""
        from ..loading import load_pretrained

        if model_args:
            raise TypeError("from_pretrained takes the checkpoint and keyword arguments only")
        return load_pretrained(cls, pretrained_model_name_or_path, **kwargs)

    def save_pretrained(self, save_directory: str | os.PathLike, **kwargs: Any) -> None:
        """Write config.json, generation_config.json and safetensors shards that transformers can open (of
        `state_dict=` instead of the model's weights when given)."""
        from ..loading import save_pretrained

        save_pretrained(self, save_directory, **kwargs)

    # ----- properties -----
    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(p.dtype for p in self.parameters() if p.is_floating_point())

    @property
    def base_model(self) -> nn.Module:
        return getattr(self, self.base_model_prefix, self)

    def get_memory_footprint(self, return_buffers: bool = True) -> int:
        """Bytes held by the parameters (quantized ones as packed) and, by default, the buffers."""
        tensors = [*self.parameters(), *(self.buffers() if return_buffers else ())]
        return sum(t.nelement() * t.element_size() for t in tensors)

    # ----- quantization (bitsandbytes, set up by from_pretrained) -----
    @property
    def is_quantized(self) -> bool:
        return getattr(self.config, "quantization_config", None) is not None

    @property
    def is_loaded_in_4bit(self) -> bool:
        return getattr(getattr(self.config, "quantization_config", None), "load_in_4bit", False)

    @property
    def is_loaded_in_8bit(self) -> bool:
        return getattr(getattr(self.config, "quantization_config", None), "load_in_8bit", False)

    def dequantize(self, dtype: torch.dtype | str | None = None) -> "PreTrainedModel":
        """Replace the quantized layers by plain ones holding their dequantized weights (in `dtype`, by default the
        dtype the model was loaded in); the model is then no longer quantized."""
        from ..quantization import weight_only

        dtype = resolve_dtype(dtype) or self.config.dtype
        if weight_only.packed_weights(self):  # int8/int4 weights (TorchAoConfig, GPTQ, AWQ, GGUF kept packed)
            weight_only.dequantize(self, dtype)
        elif self.is_quantized:
            from ..quantization.bnb import dequantize

            dequantize(self, dtype)
        else:
            raise ValueError(f"{type(self).__name__}.dequantize(): the model is not quantized; load it with "
                             "quantization_config=... (BitsAndBytesConfig, TorchAoConfig) first")
        if self.is_quantized:
            del self.config.quantization_config
        return self

    def to(self, *args: Any, **kwargs: Any):
        if self.is_quantized and ("dtype" in kwargs or any(isinstance(a, torch.dtype) for a in args)):
            raise ValueError(f"{type(self).__name__}.to(dtype): a quantized model cannot change its dtype; load it "
                             "again with from_pretrained(..., dtype=...) in the dtype you want")
        return super().to(*args, **kwargs)

    def half(self):
        return self.to(torch.float16)

    def float(self):
        return self.to(torch.float32)

    def num_parameters(self, only_trainable: bool = False, exclude_embeddings: bool = False) -> int:
        skip = {id(m.weight) for m in self.modules() if isinstance(m, nn.Embedding)} if exclude_embeddings else set()
        return sum(
            p.numel() for p in self.parameters() if id(p) not in skip and (p.requires_grad or not only_trainable)
        )

    def set_attn_implementation(self, attn_implementation: str) -> None:
        self.config._attn_implementation = check_attn_implementation(attn_implementation)

    # ----- embeddings -----
    def get_input_embeddings(self) -> nn.Embedding:
        return self.base_model.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.base_model.embed_tokens = value

    def enable_input_require_grads(self) -> None:
        """Make the embeddings' output require grad, so gradients reach adapters (peft) through reentrant
        checkpointing even when the embedding weights are frozen."""
        self.disable_input_require_grads()
        self._require_grads_hook = self.get_input_embeddings().register_forward_hook(
            lambda module, inputs, output: output.requires_grad_(True))

    def disable_input_require_grads(self) -> None:
        hook = self.__dict__.pop("_require_grads_hook", None)
        if hook is not None:
            hook.remove()

    def get_decoder(self) -> nn.Module:
        """The decoder stack: the base model of a task model, the model itself when it is the bare decoder."""
        return self.base_model

    def set_decoder(self, decoder: nn.Module) -> None:
        if self.base_model is self:
            raise ValueError(f"{type(self).__name__} is the decoder itself; call set_decoder on a task model that "
                             "holds it (e.g. the ForCausalLM class)")
        setattr(self, self.base_model_prefix, decoder)

    def get_output_embeddings(self) -> nn.Linear | None:
        return getattr(self, "lm_head", None)

    def set_output_embeddings(self, value: nn.Linear) -> None:
        self.lm_head = value

    def tie_weights(self) -> None:
        output = self.get_output_embeddings()
        if output is not None and getattr(self.config, "tie_word_embeddings", False):
            output.weight = self.get_input_embeddings().weight

    def resize_token_embeddings(self, new_num_tokens: int | None = None, pad_to_multiple_of: int | None = None,
                                mean_resizing: bool = True) -> nn.Embedding:
        """Grow or shrink the vocabulary; new rows start at the mean of the old ones (as transformers does)."""
        old = self.get_input_embeddings()
        if new_num_tokens is None and pad_to_multiple_of is None:
            return old
        size = old.num_embeddings if new_num_tokens is None else new_num_tokens
        if pad_to_multiple_of is not None:
            size = -(-size // pad_to_multiple_of) * pad_to_multiple_of
        if size <= 0:
            raise ValueError(f"new_num_tokens must be positive, got {size}")
        new = nn.Embedding(size, old.embedding_dim, padding_idx=old.padding_idx if (old.padding_idx or 0) < size else None,
                           device=old.weight.device, dtype=old.weight.dtype)
        self._fill_resized(new.weight, old.weight, mean_resizing)
        self.set_input_embeddings(new)
        output = self.get_output_embeddings()
        if output is not None and not getattr(self.config, "tie_word_embeddings", False):
            head = Linear(output.in_features, size, bias=False, device=output.weight.device, dtype=output.weight.dtype)
            self._fill_resized(head.weight, output.weight, mean_resizing)
            self.set_output_embeddings(head)
        self.config.vocab_size = size
        self.tie_weights()
        return new

    @torch.no_grad()
    def _fill_resized(self, new: torch.Tensor, old: torch.Tensor, mean_resizing: bool) -> None:
        keep = min(new.shape[0], old.shape[0])
        new[:keep] = old[:keep]
        if new.shape[0] > keep:
            if mean_resizing:
                new[keep:] = old.float().mean(dim=0).to(new.dtype)
            else:
                new[keep:].normal_(0.0, self.config.initializer_range)

    # ----- training -----
    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: dict | None = None) -> None:
        self.base_model.gradient_checkpointing = True
        self.base_model.checkpoint_kwargs = {"use_reentrant": False, **(gradient_checkpointing_kwargs or {})}
        # As transformers does: with reentrant checkpointing, frozen embeddings would otherwise stop all gradients.
        self.enable_input_require_grads()

    def gradient_checkpointing_disable(self) -> None:
        self.base_model.gradient_checkpointing = False

    @property
    def is_gradient_checkpointing(self) -> bool:
        return getattr(self.base_model, "gradient_checkpointing", False)


DTYPES = {"float32": torch.float32, "float": torch.float32, "float16": torch.float16, "half": torch.float16,
          "bfloat16": torch.bfloat16, "float64": torch.float64}


def resolve_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    """A torch dtype from a dtype, its name ("bfloat16", "torch.float16") or None; "auto" is left to the loader."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    name = str(dtype).removeprefix("torch.")
    if name not in DTYPES:
        raise ValueError(f"dtype {dtype!r} is not supported; use one of {sorted(DTYPES)} or a torch.dtype")
    return DTYPES[name]
