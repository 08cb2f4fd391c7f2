"""BitsAndBytesConfig as transformers takes and writes it, and from_pretrained's check of `quantization_config`."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, ClassVar

import torch

from ..models.modeling_utils import resolve_dtype

QUANT_TYPES = ("fp4", "nf4")
STORAGE_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32,
                  "float64": torch.float64, "int8": torch.int8, "uint8": torch.uint8}
FLAGS = ("load_in_8bit", "load_in_4bit", "llm_int8_enable_fp32_cpu_offload", "llm_int8_has_fp16_weight",
         "bnb_4bit_use_double_quant")
# Keys transformers writes into config.json besides the fields (the flags again, under private names).
WRITTEN_ONLY = ("quant_method", "_load_in_8bit", "_load_in_4bit")


@dataclass
class BitsAndBytesConfig:
    """The options of bitsandbytes quantization, with transformers' names and defaults. Dtypes may be given as
    torch dtypes or by name ("float16", "torch.float16")."""

    load_in_8bit: bool = False
    load_in_4bit: bool = False
    llm_int8_threshold: float = 6.0
    llm_int8_skip_modules: list[str] | None = None
    llm_int8_enable_fp32_cpu_offload: bool = False
    llm_int8_has_fp16_weight: bool = False
    bnb_4bit_compute_dtype: torch.dtype | str | None = None
    bnb_4bit_quant_type: str = "fp4"
    bnb_4bit_use_double_quant: bool = False
    bnb_4bit_quant_storage: torch.dtype | str | None = None

    quant_method: ClassVar[str] = "bitsandbytes"

    def __post_init__(self) -> None:
        for name in FLAGS:
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"BitsAndBytesConfig: {name} must be True or False, got {getattr(self, name)!r}")
        if self.load_in_4bit and self.load_in_8bit:
            raise ValueError("BitsAndBytesConfig: load_in_4bit and load_in_8bit are both True; set only one of them")
        if isinstance(self.llm_int8_threshold, bool) or not isinstance(self.llm_int8_threshold, (int, float)):
            raise TypeError(f"BitsAndBytesConfig: llm_int8_threshold must be a number, got {self.llm_int8_threshold!r}")
        self.llm_int8_threshold = float(self.llm_int8_threshold)
        skip = self.llm_int8_skip_modules
        if skip is not None and not (isinstance(skip, list) and all(isinstance(m, str) for m in skip)):
            raise TypeError(f"BitsAndBytesConfig: llm_int8_skip_modules must be a list of module names, got {skip!r}")
        if self.bnb_4bit_quant_type not in QUANT_TYPES:
            raise ValueError(f"BitsAndBytesConfig: bnb_4bit_quant_type must be one of {list(QUANT_TYPES)}, "
                             f"got {self.bnb_4bit_quant_type!r}")
        self.bnb_4bit_compute_dtype = _compute_dtype(self.bnb_4bit_compute_dtype)
        self.bnb_4bit_quant_storage = _storage_dtype(self.bnb_4bit_quant_storage)

    def to_dict(self) -> dict[str, Any]:
        """The fields as transformers writes them in config.json, dtypes by name."""
        out: dict[str, Any] = {"quant_method": self.quant_method, "_load_in_8bit": self.load_in_8bit,
                               "_load_in_4bit": self.load_in_4bit}
        for field in fields(self):
            value = getattr(self, field.name)
            out[field.name] = str(value).removeprefix("torch.") if isinstance(value, torch.dtype) else value
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> BitsAndBytesConfig:
        """The config from a config.json's quantization_config (as transformers or maestrale wrote it)."""
        known = {field.name for field in fields(cls)}
        unknown = sorted(set(data) - known - set(WRITTEN_ONLY))
        if unknown:
            raise ValueError(f"quantization_config has keys BitsAndBytesConfig does not know: {unknown}; remove them")
        return cls(**{key: value for key, value in data.items() if key in known})


def _compute_dtype(value: torch.dtype | str | None) -> torch.dtype:
    if value is None:
        return torch.float32
    if isinstance(value, (str, torch.dtype)):
        try:
            dtype = resolve_dtype(value)
        except ValueError:
            dtype = None
        if dtype is not None and dtype.is_floating_point:
            return dtype
    raise ValueError(f"BitsAndBytesConfig: bnb_4bit_compute_dtype {value!r} is not a float dtype; use "
                     "torch.float16, torch.bfloat16 or torch.float32 (or their names, e.g. 'float16')")


def _storage_dtype(value: torch.dtype | str | None) -> torch.dtype:
    if value is None:
        return torch.uint8
    if isinstance(value, torch.dtype) and value in STORAGE_DTYPES.values():
        return value
    if isinstance(value, str) and value.removeprefix("torch.") in STORAGE_DTYPES:
        return STORAGE_DTYPES[value.removeprefix("torch.")]
    raise ValueError(f"BitsAndBytesConfig: bnb_4bit_quant_storage {value!r} is not supported; use one of "
                     f"{sorted(STORAGE_DTYPES)}")


def check_quantization(quantization_config: Any) -> BitsAndBytesConfig | None:
    """from_pretrained(quantization_config=...): a BitsAndBytesConfig (or its dict), or None; other methods and
    values are refused, naming them."""
    if quantization_config is None or isinstance(quantization_config, BitsAndBytesConfig):
        return quantization_config
    if isinstance(quantization_config, dict) and isinstance(quantization_config.get("quant_method"), str):
        return bitsandbytes_config(quantization_config, "quantization_config")
    raise ValueError(
        f"quantization_config={quantization_config!r} is not a quantization config: pass the config object "
        "itself, e.g. quantization_config=BitsAndBytesConfig(load_in_4bit=True)"
    )


def bitsandbytes_config(data: dict[str, Any], source: str) -> BitsAndBytesConfig:
    """The BitsAndBytesConfig a quantization_config dict describes; other methods are refused by name."""
    method = data.get("quant_method", "an unknown method")
    if method != BitsAndBytesConfig.quant_method:
        raise NotImplementedError(
            f"{source} asks for {method} quantization, which maestrale does not implement; use an unquantized "
            "checkpoint (optionally with quantization_config=BitsAndBytesConfig(...)), or a GGUF file"
        )
    return BitsAndBytesConfig.from_dict(data)
