"""`accelerate(model)`: the same model object, with `generate` decoding token trees.

`generate` keeps the Hugging Face habits (input_ids, attention_mask, max_new_tokens,
eos_token_id, stopping_criteria, streamer, generation_config, do_sample with temperature, top_k,
top_p, ...) and refuses, with the fix, what would change its output: beams, and logits processors
that need the exact token history of every tree node.
"""
from __future__ import annotations

import copy
import functools
import types
from typing import Any, Callable

import torch
from transformers import GenerationConfig, LogitsProcessorList
from transformers.generation.logits_process import (
    EpsilonLogitsWarper,
    EtaLogitsWarper,
    InfNanRemoveLogitsProcessor,
    LogitNormalization,
    MinPLogitsWarper,
    TemperatureLogitsWarper,
    TopHLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
    TypicalLogitsWarper,
)

from propd_compile.config import ProPDConfig
from propd_compile.decoding import AcceptRule, greedy_rule, tree_generate
from propd_compile.drafters import build_drafter
from propd_compile.sampling import sampling_rule
from propd_compile import ragged
from propd_compile.state import attach, detach, state_of

SUPPORTED_ATTENTION = ("sdpa", "eager")
# generation_config fields that add logits processors or change the search: refused unless default.
_REFUSED_FIELDS = (
    "num_beams",
    "num_beam_groups",
    "penalty_alpha",
    "repetition_penalty",
    "encoder_repetition_penalty",
    "no_repeat_ngram_size",
    "encoder_no_repeat_ngram_size",
    "bad_words_ids",
    "force_words_ids",
    "constraints",
    "min_length",
    "min_new_tokens",
    "forced_bos_token_id",
    "forced_eos_token_id",
    "suppress_tokens",
    "begin_suppress_tokens",
    "sequence_bias",
    "exponential_decay_length_penalty",
    "renormalize_logits",
    "guidance_scale",
    "watermarking_config",
    "assistant_model",
    "prompt_lookup_num_tokens",
    "num_return_sequences",
    "stop_strings",
)
# Processors whose output depends on the scores alone: one call per tree node needs no history.
_HISTORY_FREE = (
    TemperatureLogitsWarper,
    TopHLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
    MinPLogitsWarper,
    TypicalLogitsWarper,
    EpsilonLogitsWarper,
    EtaLogitsWarper,
    InfNanRemoveLogitsProcessor,
    LogitNormalization,
)


def _check_model(model: torch.nn.Module) -> None:
    name = type(model).__name__
    config = getattr(model, "config", None)
    if config is None or not hasattr(model, "generate") or not callable(getattr(model, "get_output_embeddings", None)):
        raise TypeError(f"{name} is not a Hugging Face causal LM; propd accelerates *ForCausalLM models")
    if getattr(config, "is_encoder_decoder", False):
        raise TypeError(f"{name} is an encoder-decoder model; propd accelerates decoder-only causal LMs")
    if model.get_output_embeddings() is None:
        raise TypeError(
            f"{name} has no language-model head; load it with AutoModelForCausalLM.from_pretrained(...) instead"
        )
    impl = getattr(config, "_attn_implementation", None)
    if impl not in SUPPORTED_ATTENTION and impl not in [f"propd_{a}" for a in SUPPORTED_ATTENTION]:
        raise ValueError(
            f"{name} uses attn_implementation={impl!r}, which cannot take a 4D tree mask; "
            'call model.set_attn_implementation("sdpa") (or load with attn_implementation="sdpa")'
        )


def _text_config(model: torch.nn.Module):
    cfg = model.config
    return cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg


def _resolve_generation(model, kwargs: dict[str, Any]) -> tuple[GenerationConfig, dict[str, Any]]:
    gen = kwargs.pop("generation_config", None) or model.generation_config
    gen = copy.deepcopy(gen)
    model_kwargs = gen.update(**kwargs)
    return gen, model_kwargs


def _refuse_unsupported(gen: GenerationConfig, model_kwargs: dict[str, Any]) -> None:
    default = GenerationConfig()
    bad = [f for f in _REFUSED_FIELDS if getattr(gen, f, None) != getattr(default, f, None)]
    if bad:
        raise NotImplementedError(
            f"propd generate does not support {', '.join(f'{f}={getattr(gen, f)!r}' for f in bad)}; "
            "unset them, or call propd_compile.restore(model) to use the original generate"
        )
    if gen.return_dict_in_generate and (gen.output_scores or gen.output_logits or gen.output_hidden_states):
        raise NotImplementedError("propd generate returns sequences only (no scores, logits or hidden states)")
    unknown = set(model_kwargs) - {"attention_mask", "logits_processor", "stopping_criteria", "streamer", "use_cache"}
    if unknown:
        raise TypeError(f"propd generate got unsupported arguments: {sorted(unknown)}")
    if model_kwargs.get("logits_processor"):
        raise NotImplementedError("propd generate does not take logits processors (they could change the output)")


def _accept_rule(
    model: torch.nn.Module, gen: GenerationConfig, config: ProPDConfig, generator: torch.Generator | None, device
) -> AcceptRule:
    """Greedy, or sampling through the processors HF's own generate would build for `gen`."""
    if not gen.do_sample:
        return greedy_rule
    processors = model._get_logits_processor(gen, device=device)
    history = [type(p).__name__ for p in processors if not isinstance(p, _HISTORY_FREE)]
    if history:
        raise NotImplementedError(
            f"propd generate does not support the logits processors {history}: their output depends on the "
            "token history of each tree node; unset the options that add them, or call "
            "propd_compile.restore(model) to use the original generate"
        )
    return sampling_rule(
        LogitsProcessorList(processors), generator, config.acceptance, config.posterior_threshold, config.posterior_alpha
    )


def propd_generate(
    model: torch.nn.Module,
    inputs: torch.Tensor | None = None,
    config: ProPDConfig | None = None,
    generator: torch.Generator | None = None,
    **kwargs: Any,
):
    """Token-identical to `model.generate(..., do_sample=False)`, decoded with token trees; with
    `do_sample=True`, distributed exactly as the model's sampling (unless config.acceptance is
    "typical"). `generator` seeds the draws; without it they come from torch's global RNG."""
    state = state_of(model)
    if state is None:
        raise RuntimeError("propd_generate needs an accelerated model: call propd_compile.accelerate(model) first")
    config = config or state.config
    input_ids = kwargs.pop("input_ids", inputs)
    if input_ids is None:
        raise ValueError("generate needs input_ids (a [batch, length] tensor of token ids)")
    if input_ids.dim() == 1:
        input_ids = input_ids[None]
    gen, model_kwargs = _resolve_generation(model, kwargs)
    _refuse_unsupported(gen, model_kwargs)

    attention_mask = model_kwargs.get("attention_mask")
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    _check_prompt(input_ids, attention_mask)

    B, P = input_ids.shape
    max_new = gen.max_new_tokens if gen.max_new_tokens is not None else gen.max_length - P
    if max_new < 1:
        raise ValueError(f"nothing to generate: max_new_tokens={max_new} (prompt of {P} tokens, max_length={gen.max_length})")
    _check_context(model, int(attention_mask.sum(1).max()), max_new, config)

    eos = gen.eos_token_id
    eos_ids = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
    pad = gen.pad_token_id
    if pad is None:
        pad = eos_ids[0] if eos_ids else 0
    stopping = model_kwargs.get("stopping_criteria") or None

    accept = _accept_rule(model, gen, config, generator, input_ids.device)
    planner = state.planner(config) if config.tree == "dynamic" else None
    drafter = build_drafter(config, model, rank_stats=planner.acceptance.rank_stats if planner else None)
    taps = drafter.feature_layers
    forward = state.forward(config, hidden=drafter.needs_hidden, taps=taps)
    compiled = state.compiled(config, drafter.needs_hidden, taps)
    prefill = forward if compiled and not config.prune else None
    sequences, stats = tree_generate(
        model,
        input_ids,
        attention_mask,
        max_new_tokens=max_new,
        eos_token_ids=eos_ids,
        pad_token_id=pad,
        drafter=drafter,
        max_tree_nodes=config.max_tree_nodes,
        forward=forward,
        prefill=prefill,
        stopping_criteria=stopping,
        streamer=model_kwargs.get("streamer"),
        accept=accept,
        planner=planner,
        ragged=not config.prune,
    )
    stats.compiled = compiled
    state.stats = stats
    if gen.return_dict_in_generate:
        from transformers.generation.utils import GenerateDecoderOnlyOutput

        return GenerateDecoderOnlyOutput(sequences=sequences)
    return sequences


def _check_prompt(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> None:
    if input_ids.dim() != 2 or input_ids.shape[1] == 0:
        raise ValueError("empty prompt: input_ids has no tokens; give at least one token per row")
    if attention_mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask {tuple(attention_mask.shape)} does not match input_ids {tuple(input_ids.shape)}")
    am = attention_mask.bool()
    if not am.any(1).all():
        rows = (~am.any(1)).nonzero().flatten().tolist()
        raise ValueError(f"empty prompt in batch rows {rows}: their attention_mask is all zeros")
    # left padding: once a row starts, it never pads again
    if (am.long().cummax(1).values.bool() & ~am).any():
        raise ValueError(
            "attention_mask is not left-padded; set tokenizer.padding_side = 'left' (as for HF batched generate)"
        )


def _check_context(model: torch.nn.Module, prompt_len: int, max_new: int, config: ProPDConfig) -> None:
    cfg = _text_config(model)
    limit = getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None)
    if limit is not None and prompt_len + max_new > limit:
        raise ValueError(
            f"prompt ({prompt_len} tokens) + max_new_tokens ({max_new}) exceeds the model's context of {limit} "
            f"positions; lower max_new_tokens to at most {max(limit - prompt_len, 0)} or shorten the prompt"
        )
    window = getattr(cfg, "sliding_window", None)
    if window and "sliding_attention" in (getattr(cfg, "layer_types", None) or []):
        if prompt_len + max_new + config.max_depth > window:
            raise NotImplementedError(
                f"sequences longer than the sliding window ({window}) are not supported yet; "
                f"keep prompt + max_new_tokens under {window - config.max_depth}"
            )


def accelerate(model: Any = None, config: ProPDConfig | None = None):
    """Give `model` a token-tree `generate` (same object; idempotent; `restore` undoes it).

    Also a decorator: `@accelerate` or `@accelerate(config=...)` on a function returning a model.
    """
    if model is None:
        return functools.partial(accelerate, config=config)
    if isinstance(model, types.FunctionType):
        factory = model

        @functools.wraps(factory)
        def wrapper(*args, **kwargs):
            return accelerate(factory(*args, **kwargs), config=config)

        return wrapper
    _check_model(model)
    state = state_of(model)
    state = attach(model, config or (state.config if state else ProPDConfig()))
    if state.attention is None:  # HF's own attention, able to take ragged steps (propd_compile.ragged)
        state.attention = model.config._attn_implementation
        ragged.register()
        model.set_attn_implementation(f"propd_{state.attention}")
    if "generate" not in vars(model):
        model.generate = types.MethodType(propd_generate, model)
    return model


def restore(model: torch.nn.Module) -> torch.nn.Module:
    """Undo `accelerate`: the original `generate` comes back, and everything propd built for the
    model (compiled graphs, planners, heads) is dropped."""
    if "generate" in vars(model):
        delattr(model, "generate")
    state = state_of(model)
    if state is not None and state.attention is not None:
        model.set_attn_implementation(state.attention)
    detach(model)
    return model


def is_accelerated(model: torch.nn.Module) -> bool:
    return "generate" in vars(model) and state_of(model) is not None
