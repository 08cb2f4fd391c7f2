"""BitsAndBytesConfig and TorchAoConfig as transformers takes and writes them, the quantization_config of GPTQ and
AWQ checkpoints, and from_pretrained's check of `quantization_config`."""

from __future__ import annotations

import re
from dataclasses import dataclass, fields
from typing import Any, ClassVar

import torch

from ..models.modeling_utils import resolve_dtype
from .weight_only import INT4_GROUPS

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


TORCHAO_INSTALL = "pip install 'maestrale[torchao]'"
INT4_CONFIGS = ("Int4WeightOnlyConfig", "PrototypeInt4WeightOnlyConfig")  # torchao's int4 weight-only configs


@dataclass
class TorchAoConfig:
    """torchao weight-only quantization as transformers takes it: `quant_type` is a torchao config object,
    Int8WeightOnlyConfig() (per row) or Int4WeightOnlyConfig(group_size=32, 64, 128 or 256) with
    int4_choose_qparams_algorithm "tinygemm" (the default) or "hqq" (PrototypeInt4WeightOnlyConfig, torchao's CPU
    one, is the same quantization), or FqnToConfig({name: config or None}) to choose per layer, which also reaches
    Mixtral's stacked experts (e.g. {"_default": int4, r"re:.*\\.experts": int4}). maestrale quantizes with its own
    code and kernels; torchao is needed for its config objects only."""

    quant_type: Any
    modules_to_not_convert: list[str] | None = None
    include_input_output_embeddings: bool = False
    untie_embedding_weights: bool = False

    quant_method: ClassVar[str] = "torchao"

    def __post_init__(self) -> None:
        quant_type, name = self.quant_type, type(self.quant_type).__name__
        if isinstance(quant_type, str):  # transformers 5 refuses them too
            raise ValueError(f"TorchAoConfig: string quant_type {quant_type!r} is no longer supported; pass the "
                             "torchao config object, e.g. TorchAoConfig(Int4WeightOnlyConfig(group_size=32)) from "
                             f"torchao.quantization ({TORCHAO_INSTALL})")
        if not type(quant_type).__module__.startswith("torchao."):
            raise TypeError(f"TorchAoConfig: quant_type must be a torchao config object such as Int8WeightOnlyConfig() "
                            f"or Int4WeightOnlyConfig(group_size=128), got {quant_type!r}")
        if name == "FqnToConfig":
            for key, config in quant_type.fqn_to_config.items():
                if key.startswith("re:"):
                    try:
                        re.compile(key[3:])
                    except re.error as e:
                        raise ValueError(f"TorchAoConfig: FqnToConfig key {key!r} is not a regular expression: "
                                         f"{e}") from None
                if config is not None:
                    _check_weight_config(config, f"FqnToConfig[{key!r}] = ")
        else:
            _check_weight_config(quant_type, "")
        if self.include_input_output_embeddings:
            raise ValueError("TorchAoConfig: include_input_output_embeddings=True (quantized embeddings) is not "
                             "supported; leave it False to keep the embeddings in float")

    def weight_config(self, param: str, linear: bool) -> Any:
        """The torchao config of the weight `param` (a linear layer's `weight`, or stacked experts' `gate_up_proj` /
        `down_proj`), None to leave it in float, as transformers resolves FqnToConfig: the parameter's name, its
        module's, then the first regex ("re:...") fully matching either, then "_default" (linear layers only)."""
        if type(self.quant_type).__name__ != "FqnToConfig":
            return self.quant_type if linear else None
        table, module = self.quant_type.fqn_to_config, param.rpartition(".")[0]
        for key in (param, module):
            if key in table:
                return table[key]
        for key, config in table.items():
            if key.startswith("re:") and (re.fullmatch(key[3:], param) or re.fullmatch(key[3:], module)):
                return config
        return table.get("_default") if linear else None

    def to_dict(self) -> dict[str, Any]:
        """As transformers writes it in config.json: quant_type serialized by torchao under "default"."""
        from torchao.core.config import config_to_dict

        return {"quant_method": self.quant_method, "quant_type": {"default": config_to_dict(self.quant_type)},
                "modules_to_not_convert": self.modules_to_not_convert,
                "include_input_output_embeddings": self.include_input_output_embeddings,
                "untie_embedding_weights": self.untie_embedding_weights}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TorchAoConfig:
        try:
            from torchao.core.config import config_from_dict
        except ImportError:
            raise ImportError(f"a torchao quantization_config needs the torchao package, which is not installed: "
                              f"{TORCHAO_INSTALL}") from None
        data = {key: value for key, value in data.items() if key != "quant_method"}
        quant_type = data.pop("quant_type")
        if not (isinstance(quant_type, dict) and list(quant_type) == ["default"]):
            raise ValueError(f"quantization_config: torchao's quant_type must be {{'default': ...}}, got "
                             f"{quant_type!r}")
        return cls(config_from_dict(quant_type["default"]), **data)


def _check_weight_config(config: Any, where: str) -> None:
    """Refuse, by name, a torchao config maestrale does not implement (`where` says which entry it is)."""
    name = type(config).__name__
    if name == "Int8WeightOnlyConfig":
        granularity = type(config.granularity).__name__
        if granularity != "PerRow":
            raise ValueError(f"TorchAoConfig: {where}Int8WeightOnlyConfig(granularity={granularity}()) is not "
                             "supported; maestrale's int8 weights have one scale per row (granularity=PerRow(), the "
                             "default)")
    elif name in INT4_CONFIGS:
        if config.group_size not in INT4_GROUPS:
            raise ValueError(f"TorchAoConfig: {where}{name}(group_size={config.group_size}) is not supported; use "
                             f"group_size {', '.join(map(str, INT4_GROUPS))}")
        algorithm = int4_rule(config)[1]
        if algorithm not in ("tinygemm", "hqq"):
            raise ValueError(f"TorchAoConfig: {where}{name}(int4_choose_qparams_algorithm={algorithm!r}) is not "
                             "supported; use 'tinygemm' (the default) or 'hqq'")
    else:
        raise ValueError(f"TorchAoConfig: {where}quant_type {name} is not supported; maestrale implements torchao's "
                         "weight-only Int8WeightOnlyConfig() and Int4WeightOnlyConfig(group_size=...), chosen per "
                         "layer by FqnToConfig")


def int4_rule(config: Any) -> tuple[int | None, str]:
    """(group size, int4_choose_qparams_algorithm) of a torchao weight config; (None, "") for int8."""
    if type(config).__name__ not in INT4_CONFIGS:
        return None, ""
    algorithm = config.int4_choose_qparams_algorithm
    return config.group_size, str(getattr(algorithm, "value", algorithm)).lower()


GPTQ_DATASETS = ("wikitext2", "c4", "c4-new")  # the names transformers' GPTQConfig takes for hub datasets


def _check_group_size(name: str, group_size: Any) -> None:
    if group_size not in INT4_GROUPS:
        raise ValueError(f"{name}(group_size={group_size!r}) is not supported: use "
                         f"{', '.join(map(str, INT4_GROUPS))}, the group sizes torch's int4 products take")


def _check_calibration(config: GPTQConfig | AwqConfig) -> None:
    """The calibration options GPTQConfig and AwqConfig share: dataset (texts, not hub names), tokenizer,
    model_seqlen."""
    name = type(config).__name__
    if config.model_seqlen is not None and (isinstance(config.model_seqlen, bool)
                                            or not isinstance(config.model_seqlen, int) or config.model_seqlen < 2):
        raise ValueError(f"{name}: model_seqlen must be a number of tokens (2 or more), got {config.model_seqlen!r}")
    if isinstance(config.dataset, str):
        known = f"one of transformers' hub datasets {list(GPTQ_DATASETS)}" if config.dataset in GPTQ_DATASETS \
            else "not a dataset name transformers knows either"
        raise ValueError(f"{name}(dataset={config.dataset!r}): {known}; maestrale does not download datasets: pass "
                         "the calibration texts themselves, e.g. dataset=['a few thousand words', ...]")
    if config.dataset is not None:
        if not isinstance(config.dataset, list) or not config.dataset \
                or not all(isinstance(text, str) for text in config.dataset):
            raise TypeError(f"{name}: dataset must be a non-empty list of strings, got {type(config.dataset).__name__}")
        if config.tokenizer is None:
            raise ValueError(f"{name}: dataset needs a tokenizer to turn its texts into tokens; pass "
                             "tokenizer=AutoTokenizer.from_pretrained(...) or its folder or hub name")


@dataclass
class GPTQConfig:
    """GPTQ quantization with calibration text, with transformers' names and defaults: from_pretrained(...,
    quantization_config=GPTQConfig(bits=4, dataset=[texts], tokenizer=tokenizer)) loads the float model, then
    quantizes its decoder's linear layers to 4 bits in groups of `group_size` inputs (quantization/gptq.py). The
    tokenizer is a tokenizer object or a folder or hub name that AutoTokenizer loads. act_group_aware (GPTQModel's
    group-aware reordering, on by default as in transformers) keeps each group's inputs together, so it runs on the
    int4 products; desc_act (act-order across groups) does not and is refused."""

    bits: int
    tokenizer: Any = None
    dataset: list[str] | str | None = None
    group_size: int = 128
    damp_percent: float = 0.1
    desc_act: bool = False
    act_group_aware: bool = True
    sym: bool = True
    true_sequential: bool = True
    model_seqlen: int | None = None
    format: str = "gptq"  # the layout save_pretrained writes: "gptq" (v1, zero points stored minus one) or "gptq_v2"

    quant_method: ClassVar[str] = "gptq"

    def __post_init__(self) -> None:
        if self.bits != 4:
            raise NotImplementedError(f"GPTQConfig(bits={self.bits!r}): maestrale's GPTQ quantizes to 4 bits; for 8 "
                                      "bits use TorchAoConfig(Int8WeightOnlyConfig())")
        _check_group_size("GPTQConfig", self.group_size)
        if isinstance(self.damp_percent, bool) or not isinstance(self.damp_percent, (int, float)) \
                or not 0 < self.damp_percent < 1:
            raise ValueError(f"GPTQConfig: damp_percent must be a number between 0 and 1, got {self.damp_percent!r}")
        for name in ("desc_act", "act_group_aware", "sym", "true_sequential"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"GPTQConfig: {name} must be True or False, got {getattr(self, name)!r}")
        if self.desc_act:
            raise NotImplementedError("GPTQConfig(desc_act=True): act-order permutes each layer's inputs, which the "
                                      "int4 products cannot follow; use desc_act=False")
        if self.format not in ("gptq", "gptq_v2"):
            raise ValueError(f"GPTQConfig(format={self.format!r}) is not supported: use 'gptq' (v1) or 'gptq_v2'")
        _check_calibration(self)

    def to_dict(self) -> dict[str, Any]:
        """As GPTQ checkpoints' config.json holds it (the calibration texts and the tokenizer are not written)."""
        return {"quant_method": self.quant_method, "bits": self.bits, "group_size": self.group_size,
                "damp_percent": self.damp_percent, "desc_act": self.desc_act,
                "act_group_aware": self.act_group_aware, "sym": self.sym,
                "true_sequential": self.true_sequential, "model_seqlen": self.model_seqlen,
                "checkpoint_format": self.format}


@dataclass
class AwqConfig:
    """AWQ quantization with calibration text (Lin et al. 2023, "AWQ: Activation-aware Weight Quantization for LLM
    Compression and Acceleration"), with the fields of transformers' AwqConfig and GPTQConfig's dataset and tokenizer:
    from_pretrained(..., quantization_config=AwqConfig(dataset=[texts], tokenizer=tokenizer)) loads the float model,
    then scales each input channel of the decoder's linear layers by what its activations weigh, folds the inverse
    into the norm or projection before them, and rounds to 4 bits in groups of `group_size` inputs
    (quantization/awq.py). save_pretrained writes AWQ's GEMM checkpoint layout. (AWQ checkpoints load without any
    config.)"""

    bits: int = 4
    group_size: int = 128
    zero_point: bool = True
    version: str = "gemm"  # the layout save_pretrained writes
    tokenizer: Any = None
    dataset: list[str] | str | None = None
    model_seqlen: int | None = None

    quant_method: ClassVar[str] = "awq"

    def __post_init__(self) -> None:
        if self.bits != 4:
            raise NotImplementedError(f"AwqConfig(bits={self.bits!r}): AWQ quantizes to 4 bits; for 8 bits use "
                                      "TorchAoConfig(Int8WeightOnlyConfig())")
        _check_group_size("AwqConfig", self.group_size)
        if self.zero_point is not True:
            raise NotImplementedError(f"AwqConfig(zero_point={self.zero_point!r}): AWQ's GEMM layout holds a zero "
                                      "point per group; use zero_point=True")
        if str(self.version).lower() != "gemm":
            raise NotImplementedError(f"AwqConfig(version={self.version!r}): maestrale writes AWQ's 'gemm' layout; "
                                      "use version='gemm'")
        _check_calibration(self)

    def to_dict(self) -> dict[str, Any]:
        """As AWQ checkpoints' config.json holds it (the calibration texts and the tokenizer are not written)."""
        return {"quant_method": self.quant_method, "bits": self.bits, "group_size": self.group_size,
                "zero_point": self.zero_point, "version": "gemm", "modules_to_not_convert": None}


@dataclass
class PackedInt4Config:
    """The quantization_config of a GPTQ or AWQ checkpoint, whose 4-bit tensors maestrale reads (and writes back in
    their layout: loading/layout.py)."""

    quant_method: str  # "gptq" or "awq"
    group_size: int  # -1: one group per row
    zero_offset: int  # added to each stored zero point: 1 in GPTQ's v1 format, which stores them minus one
    data: dict[str, Any]  # the whole quantization_config, written back as it was read

    def to_dict(self) -> dict[str, Any]:
        return dict(self.data)

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str) -> PackedInt4Config:
        """The description of a gptq or awq quantization_config; variants maestrale does not read are refused by
        field and value."""
        method = data["quant_method"]
        bits = data.get("bits", data.get("w_bit"))
        if bits != 4:
            raise NotImplementedError(f"{source}: {method} checkpoint with bits={bits}; maestrale loads 4-bit "
                                      f"{method} checkpoints only")
        group_size = data.get("group_size", data.get("q_group_size", 128))
        if not isinstance(group_size, int) or (group_size <= 0 and group_size != -1):
            raise ValueError(f"{source}: {method} group_size={group_size!r} is neither a positive size nor -1")
        if method == "gptq":
            field = "checkpoint_format" if "checkpoint_format" in data else "format"
            layout = str(data.get(field, "gptq")).lower()
            if layout not in ("gptq", "gptq_v2"):
                raise NotImplementedError(f"{source}: gptq {field}={layout!r} is not supported; maestrale reads the "
                                          "'gptq' (v1) and 'gptq_v2' layouts")
            return cls(method, group_size, 1 if layout == "gptq" else 0, data)
        field = "version" if "version" in data else "format"
        layout = str(data.get(field, "gemm")).lower()
        if layout != "gemm":
            raise NotImplementedError(f"{source}: awq {field}={layout!r} is not supported; maestrale reads AWQ's "
                                      "'gemm' layout")
        return cls(method, group_size, 0, data)


QuantizationConfig = BitsAndBytesConfig | TorchAoConfig | GPTQConfig | AwqConfig | PackedInt4Config


def check_quantization(quantization_config: Any
                       ) -> BitsAndBytesConfig | TorchAoConfig | GPTQConfig | AwqConfig | None:
    """from_pretrained(quantization_config=...): a BitsAndBytesConfig, TorchAoConfig, GPTQConfig or AwqConfig (or the
    dict of one of the first two), or None; other methods and values are refused, naming them."""
    if quantization_config is None or isinstance(quantization_config, (BitsAndBytesConfig, TorchAoConfig,
                                                                       GPTQConfig, AwqConfig)):
        return quantization_config
    if isinstance(quantization_config, dict) and isinstance(quantization_config.get("quant_method"), str):
        config = saved_quantization_config(quantization_config, "quantization_config")
        if isinstance(config, PackedInt4Config):
            maker = "GPTQConfig" if config.quant_method == "gptq" else "AwqConfig"
            make = f"quantize with {maker}(bits=4, dataset=[texts], tokenizer=...) to make one"
            raise ValueError(f"quantization_config: a {config.quant_method} dict describes a checkpoint quantized "
                             f"beforehand, which maestrale loads as it is (drop quantization_config); {make}")
        return config
    raise ValueError(
        f"quantization_config={quantization_config!r} is not a quantization config: pass the config object "
        "itself, e.g. quantization_config=BitsAndBytesConfig(load_in_4bit=True)"
    )


def saved_quantization_config(data: dict[str, Any], source: str) -> QuantizationConfig:
    """The config a quantization_config dict describes (bitsandbytes, torchao, gptq, awq); other methods are refused
    by name."""
    method = data.get("quant_method", "an unknown method")
    if method == BitsAndBytesConfig.quant_method:
        return BitsAndBytesConfig.from_dict(data)
    if method == TorchAoConfig.quant_method:
        return TorchAoConfig.from_dict(data)
    if method in ("gptq", "awq"):
        return PackedInt4Config.from_dict(data, source)
    raise NotImplementedError(
        f"{source} asks for {method} quantization, which maestrale does not implement; use an unquantized checkpoint "
        "(optionally with quantization_config=BitsAndBytesConfig(...) or TorchAoConfig(...)), or a GGUF file"
    )
