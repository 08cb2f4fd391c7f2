"""Model API added for everyday transformers code: input grads for adapters, decoder access, main_input_name,
the XPreTrainedModel classes; each checked against transformers."""

import warnings

import pytest
import torch
import transformers

import maestrale
from parity import config_pair, model_pair

NAMES = {"mistral": "Mistral", "ministral": "Ministral", "mixtral": "Mixtral", "phi3": "Phi3"}
TASKS = ["Model", "ForCausalLM", "ForSequenceClassification", "ForTokenClassification", "ForQuestionAnswering"]


def q_proj_grads(model, ids):
    model.zero_grad()
    with warnings.catch_warnings():  # reentrant checkpointing warns when no input requires grad
        warnings.simplefilter("ignore")
        loss = model(ids, labels=ids).loss
    if loss.requires_grad:
        loss.backward()
    grad = model.model.layers[1].self_attn.q_proj.weight.grad
    return None if grad is None else grad.clone()


def test_input_require_grads_let_adapters_train_under_reentrant_checkpointing():
    """Frozen embeddings + reentrant checkpointing: gradients reach the layers only through the hook, which
    gradient_checkpointing_enable installs (as transformers does); disable/enable remove and restore it."""
    ref, ours = model_pair("mistral")
    ids = torch.randint(0, 97, (2, 6))
    for model in (ref, ours):
        model.train()
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
        for name, param in model.named_parameters():
            param.requires_grad_("q_proj" in name)  # as an adapter would: everything else frozen
    expected, got = q_proj_grads(ref, ids), q_proj_grads(ours, ids)
    assert got is not None and got.abs().sum() > 0
    torch.testing.assert_close(got, expected)
    ref.disable_input_require_grads()
    ours.disable_input_require_grads()
    assert q_proj_grads(ref, ids) is None and q_proj_grads(ours, ids) is None
    ours.disable_input_require_grads()  # without a hook: nothing to do, as in transformers
    ref.enable_input_require_grads()
    ours.enable_input_require_grads()
    ours.enable_input_require_grads()  # twice: still one hook
    assert len(ours.get_input_embeddings()._forward_hooks) == 1
    torch.testing.assert_close(q_proj_grads(ours, ids), q_proj_grads(ref, ids))


@pytest.mark.parametrize("task", ["ForCausalLM", "ForSequenceClassification", "Model"])
def test_get_decoder(task):
    ref, ours = model_pair("phi3", task)
    assert (ours.get_decoder() is ours) == (ref.get_decoder() is ref)
    assert type(ours.get_decoder()).__name__ == type(ref.get_decoder()).__name__
    if task != "Model":
        assert ours.get_decoder() is ours.model and ref.get_decoder() is ref.model


def test_set_decoder():
    _, ours = model_pair("mistral")
    decoder = maestrale.MistralModel(ours.config)
    ours.set_decoder(decoder)
    assert ours.get_decoder() is decoder and ours.model is decoder
    with pytest.raises(ValueError, match="is the decoder itself"):
        decoder.set_decoder(maestrale.MistralModel(ours.config))


@pytest.mark.parametrize("task", TASKS)
def test_main_input_name(task):
    ref_cls = getattr(transformers, f"Mistral{task}")
    assert getattr(maestrale, f"Mistral{task}").main_input_name == ref_cls.main_input_name == "input_ids"


def test_pretrained_classes_relate_as_in_transformers():
    for family, name in NAMES.items():
        ours_base, ref_base = getattr(maestrale, f"{name}PreTrainedModel"), getattr(transformers, f"{name}PreTrainedModel")
        assert issubclass(ours_base, maestrale.PreTrainedModel)
        assert ours_base.config_class is getattr(maestrale, f"{name}Config")
        assert ours_base.base_model_prefix == ref_base.base_model_prefix
        for task in TASKS:
            ref_cls = getattr(transformers, f"{name}{task}", None)
            if ref_cls is None:  # transformers has no Phi3ForQuestionAnswering
                continue
            for other in NAMES.values():
                expected = issubclass(ref_cls, getattr(transformers, f"{other}PreTrainedModel"))
                assert issubclass(getattr(maestrale, f"{name}{task}"), getattr(maestrale, f"{other}PreTrainedModel")) \
                    == expected, (name, task, other)
    _, config = config_pair("mixtral")
    model = maestrale.AutoModelForCausalLM.from_config(config)
    assert isinstance(model, maestrale.MixtralPreTrainedModel) and not isinstance(model, maestrale.MistralPreTrainedModel)
