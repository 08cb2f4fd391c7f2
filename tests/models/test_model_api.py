"""What users rely on from a model object, and clear errors for bad inputs."""

import pytest
import torch
import transformers

import maestrale
from maestrale import (AutoModel, AutoModelForCausalLM, AutoModelForQuestionAnswering,
                       AutoModelForSequenceClassification, AutoModelForTokenClassification, DynamicCache)
from parity import SMALL, config_pair, model_pair


@pytest.mark.parametrize("auto, task", [(AutoModel, "Model"), (AutoModelForCausalLM, "ForCausalLM"),
                                        (AutoModelForSequenceClassification, "ForSequenceClassification"),
                                        (AutoModelForTokenClassification, "ForTokenClassification"),
                                        (AutoModelForQuestionAnswering, "ForQuestionAnswering")])
@pytest.mark.parametrize("family, name", [("mistral", "Mistral"), ("ministral", "Ministral"), ("mixtral", "Mixtral"),
                                          ("phi3", "Phi3")])
def test_auto_classes_pick_the_family_and_share_state_dict_names(auto, task, family, name):
    _, config = config_pair(family)
    model = auto.from_config(config)
    assert type(model) is getattr(maestrale, f"{name}{task}")
    ref_cls = getattr(transformers, f"{name}{task}", None)
    if ref_cls is not None:  # transformers has no Phi3ForQuestionAnswering
        ref_config, _ = config_pair(family)
        ref = ref_cls(ref_config)
        assert {k: tuple(v.shape) for k, v in ref.state_dict().items()} == \
               {k: tuple(v.shape) for k, v in model.state_dict().items()}


def test_properties_parameters_and_dtype():
    ref, ours = model_pair("mixtral", num_local_experts=4)
    assert ours.device == torch.device("cpu") and ours.dtype == torch.float32
    assert ours.num_parameters() == ref.num_parameters()
    assert ours.num_parameters(exclude_embeddings=True) == ref.num_parameters(exclude_embeddings=True)
    bf16 = AutoModelForCausalLM.from_config(ours.config, dtype=torch.bfloat16)
    assert bf16.dtype == torch.bfloat16 and torch.get_default_dtype() == torch.float32
    assert ours.to(torch.float64).dtype == torch.float64


def test_tied_embeddings_and_resize_match_transformers():
    ref, ours = model_pair("mistral", tie_word_embeddings=True)
    assert ours.lm_head.weight is ours.get_input_embeddings().weight
    ref.resize_token_embeddings(120)
    ours.resize_token_embeddings(120)
    assert ours.config.vocab_size == 120 and ours.lm_head.weight is ours.model.embed_tokens.weight
    # transformers draws new rows around the old mean with covariance x 1e-9; maestrale takes the mean itself.
    new, old = ours.get_input_embeddings().weight, ref.get_input_embeddings().weight
    torch.testing.assert_close(new[:97], old[:97], atol=0, rtol=0)
    torch.testing.assert_close(new[97:], old[97:], atol=1e-3, rtol=0)
    ids = torch.randint(0, 97, (1, 6))
    with torch.no_grad():
        ours_logits, ref_logits = ours(ids).logits, ref(ids).logits
    assert ours_logits.shape == (1, 6, 120)
    torch.testing.assert_close(ours_logits[..., :97], ref_logits[..., :97])
    ref, ours = model_pair("phi3")  # untied: the head grows too
    ours.resize_token_embeddings(101, pad_to_multiple_of=8)
    assert ours.get_output_embeddings().weight.shape == (104, SMALL["hidden_size"])


def test_embedding_getters_and_setters():
    _, ours = model_pair("mistral")
    new = torch.nn.Embedding(SMALL["vocab_size"], SMALL["hidden_size"])
    ours.set_input_embeddings(new)
    assert ours.get_input_embeddings() is new and ours.model.embed_tokens is new
    head = torch.nn.Linear(SMALL["hidden_size"], SMALL["vocab_size"], bias=False)
    ours.set_output_embeddings(head)
    assert ours.get_output_embeddings() is head


def test_transformers_state_dict_loads_strict():
    for family in ("mistral", "ministral", "mixtral", "phi3"):
        ref_config, config = config_pair(family)
        for task in ("ForCausalLM", "ForSequenceClassification", "ForTokenClassification"):
            name = type(config).__name__.removesuffix("Config")
            ref = getattr(transformers, f"{name}{task}")(ref_config)
            getattr(maestrale, f"{name}{task}")(config).load_state_dict(ref.state_dict(), strict=True)


@pytest.fixture(scope="module")
def model():
    return model_pair("mistral", sliding_window=4)[1]


@pytest.mark.parametrize(
    "kwargs, error, culprit",
    [
        (dict(), ValueError, "exactly one of input_ids and inputs_embeds"),
        (dict(input_ids=torch.ones(2, 3, dtype=torch.long), inputs_embeds=torch.ones(2, 3, 32)), ValueError,
         "exactly one"),
        (dict(input_ids=torch.ones(3, dtype=torch.long)), ValueError, "input_ids must be 2-D"),
        (dict(input_ids=torch.ones(1, 3)), TypeError, "integer token ids"),
        (dict(inputs_embeds=torch.ones(1, 3, 31)), ValueError, "hidden_size=32"),
        (dict(inputs_embeds=torch.ones(1, 3, 32, dtype=torch.long)), TypeError, "floating point"),
        (dict(input_ids=torch.ones(2, 3, dtype=torch.long), attention_mask=torch.ones(2, 4)), ValueError,
         "attention_mask must have shape"),
        (dict(input_ids=torch.ones(2, 3, dtype=torch.long), position_ids=torch.arange(4)[None]), ValueError,
         "position_ids"),
        (dict(input_ids=torch.ones(1, 3, dtype=torch.long), past_key_values=((torch.ones(1),),)), TypeError,
         "Cache"),
        (dict(input_ids=torch.ones(1, 0, dtype=torch.long)), ValueError, "empty"),
    ],
)
def test_bad_inputs_raise_clear_errors(model, kwargs, error, culprit):
    with pytest.raises(error, match=culprit):
        model(**kwargs)


def test_cache_from_another_model_is_refused(model):
    _, other = config_pair("mistral", num_key_value_heads=4)
    with pytest.raises(ValueError, match="another model"):
        model(torch.ones(1, 3, dtype=torch.long), past_key_values=DynamicCache(other))
    cache = DynamicCache()  # built without a config: caught at the first layer's update
    cache.update(torch.ones(1, 4, 1, 8), torch.ones(1, 4, 1, 8), 0)
    cache.shape = (4, 8)
    with pytest.raises(ValueError, match="another model"):
        model(torch.ones(1, 3, dtype=torch.long), past_key_values=cache)


def test_unknown_attn_implementation():
    _, config = config_pair("mistral")
    with pytest.raises(ValueError, match="'flash_attention_3' is not supported; use one of .*'flash_attention_2'"):
        AutoModelForCausalLM.from_config(config, attn_implementation="flash_attention_3")
    with pytest.raises(ValueError, match="'fast'"):
        maestrale.MistralForCausalLM(maestrale.MistralConfig(**SMALL, attn_implementation="fast"))


def test_wrong_config_class():
    _, config = config_pair("phi3")
    with pytest.raises(TypeError, match="MistralConfig"):
        maestrale.MistralModel(config)
