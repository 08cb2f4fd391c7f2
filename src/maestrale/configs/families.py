"""The four family configs: field defaults as transformers documents them, plus what each family adds."""

from __future__ import annotations

from .base import LAYER_TYPES, PretrainedConfig


class DecoderConfig(PretrainedConfig):
    """Fields shared by every family (defaults as in Mistral-7B)."""

    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 14336
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = 8
    hidden_act: str = "silu"
    max_position_embeddings: int = 131072
    initializer_range: float = 0.02
    rms_norm_eps: float = 1e-6
    use_cache: bool = True
    pad_token_id: int | None = None
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2
    tie_word_embeddings: bool = False
    rope_parameters: dict | None = None
    sliding_window: int | None = 4096
    attention_dropout: float = 0.0

    def __post_init__(self) -> None:
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads

    @property
    def attention_layer_types(self) -> list[str]:
        """Which attention each layer uses: the whole decoder slides when a window is set."""
        kind = "full_attention" if self.sliding_window is None else "sliding_attention"
        return [kind] * self.num_hidden_layers


class MistralConfig(DecoderConfig):
    model_type = "mistral"

    head_dim: int | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.head_dim is None and self.hidden_size % self.num_attention_heads == 0:  # else validate() says why
            self.head_dim = self.hidden_size // self.num_attention_heads


class MinistralConfig(MistralConfig):
    model_type = "ministral"

    layer_types: list[str] | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.layer_types is None:
            self.layer_types = DecoderConfig.attention_layer_types.fget(self)

    def validate(self) -> None:
        super().validate()
        if len(self.layer_types) != self.num_hidden_layers:
            raise ValueError(
                f"layer_types has {len(self.layer_types)} entries but num_hidden_layers is {self.num_hidden_layers}"
            )
        for i, kind in enumerate(self.layer_types):
            if kind not in LAYER_TYPES:
                raise ValueError(f"layer_types[{i}] is {kind!r}; expected one of {list(LAYER_TYPES)}")
        if "sliding_attention" in self.layer_types and self.sliding_window is None:
            raise ValueError("layer_types has sliding_attention layers but sliding_window is None; set sliding_window")

    @property
    def attention_layer_types(self) -> list[str]:
        return list(self.layer_types)


class MixtralConfig(MistralConfig):
    model_type = "mixtral"
    default_rope_theta = 1e6

    rms_norm_eps: float = 1e-5
    sliding_window: int | None = None
    num_experts_per_tok: int = 2
    num_local_experts: int = 8
    output_router_logits: bool = False
    router_aux_loss_coef: float = 0.001
    router_jitter_noise: float = 0.0

    def __post_init__(self) -> None:
        DecoderConfig.__post_init__(self)  # transformers leaves Mixtral's head_dim None: the layers derive it

    def validate(self) -> None:
        super().validate()
        if not isinstance(self.num_local_experts, int) or self.num_local_experts < 1:
            raise ValueError(f"num_local_experts must be a positive integer, got {self.num_local_experts!r}")
        if not isinstance(self.num_experts_per_tok, int) or not 1 <= self.num_experts_per_tok <= self.num_local_experts:
            raise ValueError(
                f"num_experts_per_tok ({self.num_experts_per_tok!r}) must be between 1 and "
                f"num_local_experts ({self.num_local_experts})"
            )
        if not 0.0 <= self.router_jitter_noise < 1.0:
            raise ValueError(f"router_jitter_noise must be in [0, 1), got {self.router_jitter_noise!r}")


class Phi3Config(DecoderConfig):
    model_type = "phi3"
    rope_types = ("default", "longrope")
    # Early Phi-3 configs call longrope "su"; transformers also reads "yarn" as longrope for this family.
    rope_type_aliases = {"su": "longrope", "yarn": "longrope"}

    vocab_size: int = 32064
    hidden_size: int = 3072
    intermediate_size: int = 8192
    num_key_value_heads: int | None = None
    resid_pdrop: float = 0.0
    embd_pdrop: float = 0.0
    max_position_embeddings: int = 4096
    original_max_position_embeddings: int = 4096
    rms_norm_eps: float = 1e-5
    eos_token_id: int | list[int] | None = 32000
    pad_token_id: int | None = 32000
    sliding_window: int | None = None

    def _standardize_rope(self, rope_parameters, rope_scaling, rope_theta) -> dict:
        params = super()._standardize_rope(rope_parameters, rope_scaling, rope_theta)
        params.setdefault("partial_rotary_factor", 1.0)
        return params


CONFIG_MAPPING: dict[str, type[PretrainedConfig]] = {
    cls.model_type: cls for cls in (MistralConfig, MixtralConfig, MinistralConfig, Phi3Config)
}
