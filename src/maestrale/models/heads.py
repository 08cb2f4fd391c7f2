"""Task heads over the shared decoder: causal LM, sequence and token classification, question answering."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..generation.utils import GenerationMixin
from .linear import Linear
from .mlp import load_balancing_loss
from .modeling_utils import PreTrainedModel
from .outputs import (
    CausalLMOutputWithPast,
    MoeCausalLMOutputWithPast,
    QuestionAnsweringModelOutput,
    SequenceClassifierOutputWithPast,
    TokenClassifierOutput,
)


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor, num_items_in_batch: int | torch.Tensor | None = None):
    """Next-token cross entropy: position t predicts labels[t + 1]; -100 is ignored."""
    shift_labels = F.pad(labels, (0, 1), value=-100)[..., 1:].reshape(-1).to(logits.device)
    logits = logits.float().reshape(-1, logits.shape[-1])
    if num_items_in_batch is None:
        return F.cross_entropy(logits, shift_labels, ignore_index=-100)
    return F.cross_entropy(logits, shift_labels, ignore_index=-100, reduction="sum") / num_items_in_batch


class HeadModel(PreTrainedModel):
    """A decoder (at `base_model_prefix`, usually `model`) plus a head; `base_class` is the family's decoder class."""

    base_class: type[PreTrainedModel]

    def __init__(self, config):
        super().__init__(config)
        setattr(self, self.base_model_prefix, self.base_class(config))

    def _run_base(self, input_ids, attention_mask, position_ids, past_key_values, inputs_embeds, use_cache,
                  output_attentions, output_hidden_states, **extra):
        return self.base_model(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
            past_key_values=past_key_values, inputs_embeds=inputs_embeds, use_cache=use_cache,
            output_attentions=output_attentions, output_hidden_states=output_hidden_states, return_dict=True, **extra,
        )

    def _finish(self, out, return_dict: bool | None):
        return out if (self.config.return_dict if return_dict is None else return_dict) else out.to_tuple()


class ForCausalLM(GenerationMixin, HeadModel):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config):
        super().__init__(config)
        self.lm_head = Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        position_ids=None,
        past_key_values=None,
        inputs_embeds=None,
        labels=None,
        use_cache=None,
        output_attentions=None,
        output_hidden_states=None,
        output_router_logits=None,
        return_dict=None,
        logits_to_keep: int | torch.Tensor = 0,
        num_items_in_batch=None,
        cache_position=None,
        cache=None,  # transformers' newer name of past_key_values
        cu_seq_lens_q=None,
        cu_seq_lens_k=None,
        max_length_q=None,
        max_length_k=None,
    ) -> CausalLMOutputWithPast | MoeCausalLMOutputWithPast | tuple:
        moe = self.base_model.is_moe
        if output_router_logits is None:
            output_router_logits = getattr(self.config, "output_router_logits", False)
        extra = {"output_router_logits": output_router_logits} if moe else {}
        extra.update(cu_seq_lens_q=cu_seq_lens_q, cu_seq_lens_k=cu_seq_lens_k, max_length_q=max_length_q,
                     max_length_k=max_length_k)
        out = self._run_base(input_ids, attention_mask, position_ids, past_key_values, inputs_embeds, use_cache,
                             output_attentions, output_hidden_states, cache=cache, **extra)
        hidden = out.last_hidden_state
        if isinstance(logits_to_keep, int):
            hidden = hidden[:, -logits_to_keep:] if logits_to_keep else hidden
        else:
            hidden = hidden[:, logits_to_keep]
        logits = self.lm_head(hidden)
        loss = causal_lm_loss(logits, labels, num_items_in_batch) if labels is not None else None
        common = dict(logits=logits, past_key_values=out.past_key_values, hidden_states=out.hidden_states,
                      attentions=out.attentions)
        if not moe:
            return self._finish(CausalLMOutputWithPast(loss=loss, **common), return_dict)
        aux_loss = None
        if output_router_logits:
            aux_loss = load_balancing_loss(out.router_logits, self.config.num_local_experts,
                                           self.config.num_experts_per_tok, attention_mask)
            if loss is not None:
                loss = loss + self.config.router_aux_loss_coef * aux_loss.to(loss.device)
        return self._finish(
            MoeCausalLMOutputWithPast(loss=loss, aux_loss=aux_loss, router_logits=out.router_logits, **common),
            return_dict,
        )


class ForSequenceClassification(HeadModel):
    """Scores the last non-padding token of each sequence, wherever the padding sits."""

    def __init__(self, config):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.score = nn.Linear(config.hidden_size, config.num_labels, bias=False)
        self.post_init()

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                inputs_embeds=None, labels=None, use_cache=None, output_attentions=None, output_hidden_states=None,
                return_dict=None, cache_position=None, cache=None) -> SequenceClassifierOutputWithPast | tuple:
        out = self._run_base(input_ids, attention_mask, position_ids, past_key_values, inputs_embeds, use_cache,
                             output_attentions, output_hidden_states, cache=cache)
        logits = self.score(out.last_hidden_state)
        batch = logits.shape[0]
        pad = self.config.pad_token_id
        if pad is None and batch != 1:
            raise ValueError("sequence classification of a batch needs config.pad_token_id to find each sequence's end")
        if pad is None or input_ids is None:
            last = torch.full((batch,), logits.shape[1] - 1, device=logits.device)
        else:
            # The highest index holding a real token: right padding ends before it, left padding sits below it.
            positions = torch.arange(input_ids.shape[-1], device=logits.device)
            last = (positions * (input_ids != pad).to(logits.device)).argmax(-1)
        pooled = logits[torch.arange(batch, device=logits.device), last]
        loss = self._loss(pooled, labels) if labels is not None else None
        return self._finish(
            SequenceClassifierOutputWithPast(loss=loss, logits=pooled, past_key_values=out.past_key_values,
                                             hidden_states=out.hidden_states, attentions=out.attentions),
            return_dict,
        )

    def _loss(self, pooled: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        labels = labels.to(pooled.device)
        problem = self.config.problem_type
        if problem is None:
            if self.num_labels == 1:
                problem = "regression"
            elif labels.dtype in (torch.long, torch.int):
                problem = "single_label_classification"
            else:
                problem = "multi_label_classification"
            self.config.problem_type = problem  # transformers records the inferred kind, and saves it
        if problem == "regression":
            if self.num_labels == 1:
                return F.mse_loss(pooled.squeeze(), labels.squeeze())
            return F.mse_loss(pooled, labels)
        if problem == "single_label_classification":
            return F.cross_entropy(pooled.view(-1, self.num_labels), labels.view(-1))
        if problem == "multi_label_classification":
            return F.binary_cross_entropy_with_logits(pooled, labels)
        raise ValueError(
            f"config.problem_type {problem!r} is unknown; use regression, single_label_classification "
            "or multi_label_classification"
        )


class ForTokenClassification(HeadModel):
    def __init__(self, config):
        super().__init__(config)
        self.num_labels = config.num_labels
        dropout = getattr(config, "classifier_dropout", None)
        if dropout is None:
            dropout = getattr(config, "hidden_dropout", None)
        self.dropout = nn.Dropout(0.1 if dropout is None else dropout)
        self.score = nn.Linear(config.hidden_size, config.num_labels, bias=getattr(config, "token_classification_bias", True))
        self.post_init()

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                inputs_embeds=None, labels=None, use_cache=None, output_attentions=None, output_hidden_states=None,
                return_dict=None, cache_position=None, cache=None) -> TokenClassifierOutput | tuple:
        out = self._run_base(input_ids, attention_mask, position_ids, past_key_values, inputs_embeds, use_cache,
                             output_attentions, output_hidden_states, cache=cache)
        logits = self.score(self.dropout(out.last_hidden_state))
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits.float().view(-1, self.num_labels), labels.to(logits.device).view(-1),
                                   ignore_index=-100)
        return self._finish(
            TokenClassifierOutput(loss=loss, logits=logits, hidden_states=out.hidden_states,
                                  attentions=out.attentions),
            return_dict,
        )


class ForQuestionAnswering(HeadModel):
    def __init__(self, config):
        super().__init__(config)
        self.qa_outputs = nn.Linear(config.hidden_size, 2)
        self.post_init()

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                inputs_embeds=None, start_positions=None, end_positions=None, use_cache=None,
                output_attentions=None, output_hidden_states=None, return_dict=None,
                cache_position=None, cache=None) -> QuestionAnsweringModelOutput | tuple:
        out = self._run_base(input_ids, attention_mask, position_ids, past_key_values, inputs_embeds, use_cache,
                             output_attentions, output_hidden_states, cache=cache)
        start_logits, end_logits = (t.squeeze(-1).contiguous() for t in self.qa_outputs(out.last_hidden_state).split(1, dim=-1))
        loss = None
        if start_positions is not None and end_positions is not None:
            # Positions outside the sequence are clamped to an ignored index, as transformers does.
            ignored = start_logits.shape[1]
            losses = []
            for logits, positions in ((start_logits, start_positions), (end_logits, end_positions)):
                positions = positions.reshape(-1).clamp(0, ignored).to(logits.device)
                losses.append(F.cross_entropy(logits.float(), positions, ignore_index=ignored))
            loss = (losses[0] + losses[1]) / 2
        return self._finish(
            QuestionAnsweringModelOutput(loss=loss, start_logits=start_logits, end_logits=end_logits,
                                         hidden_states=out.hidden_states, attentions=out.attentions),
            return_dict,
        )
