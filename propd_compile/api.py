"""`accelerate(model)`: the same model object, with `generate` decoding token trees.

`generate` keeps the Hugging Face habits: it prepares the call with HF's own code (generation
config, special tokens, lengths, logits processors, stopping criteria), so input_ids,
attention_mask, max_new_tokens, eos_token_id, stopping_criteria, stop_strings (with tokenizer=),
streamer, generation_config, the logits processors HF builds (repetition penalty, no-repeat
n-grams, min length, bad words, ...) and user `logits_processor=` lists, do_sample with its
warpers, num_return_sequences and output_scores / output_logits behave as in HF's `generate`
(`processing.py` runs the processors on every tree node's exact history). What token trees
cannot run (beams, contrastive search, assisted decoding, ...) is refused with the reason.
"""
from __future__ import annotations

import functools
import types
from dataclasses import dataclass
from typing import Any

import torch
from transformers import GenerationConfig, LogitsProcessorList, StoppingCriteriaList
from transformers.generation.configuration_utils import GenerationMode
from transformers.generation.stopping_criteria import EosTokenCriteria, MaxLengthCriteria

from propd_compile.config import ProPDConfig
from propd_compile.decoding import greedy_rule, tree_generate
from propd_compile.drafters import build_drafter
from propd_compile.processing import NodeProcessing
from propd_compile.sampling import sampling_rule
from propd_compile import ragged
from propd_compile.state import attach, detach, state_of

SUPPORTED_ATTENTION = ("sdpa", "eager")
_BEAMS = (("num_beams", "num_beam_groups", "force_words_ids", "constraints"),
          "beam search keeps several hypotheses per row and reorders them every step; a token tree verifies one "
          "continuation per row")
_ASSISTED = "assisted and prompt-lookup decoding are another speculative decoder; propd drafts its own token trees"
# HF generation modes other than greedy and sampling: the fields that select them, and why token
# trees do not run them.
_REFUSED_MODES = {
    GenerationMode.BEAM_SEARCH: _BEAMS,
    GenerationMode.BEAM_SAMPLE: _BEAMS,
    GenerationMode.GROUP_BEAM_SEARCH: _BEAMS,
    GenerationMode.CONSTRAINED_BEAM_SEARCH: _BEAMS,
    GenerationMode.CONTRASTIVE_SEARCH: (("penalty_alpha", "top_k"), (
        "contrastive search re-ranks candidates by the similarity of their hidden states to the past ones, which "
        "tree verification does not compute")),
    GenerationMode.ASSISTED_GENERATION: (("prompt_lookup_num_tokens",), _ASSISTED),
    GenerationMode.DOLA_GENERATION: (("dola_layers",), (
        "DoLa contrasts early-layer logits with the final ones, which tree verification does not return")),
}
# generation_config fields (set and not at their no-op value) that need more than each node's history.
_REFUSED_FIELDS = {
    "guidance_scale": "classifier-free guidance runs a second, unconditional forward with its own cache every step",
    "encoder_no_repeat_ngram_size": "its processor matches n-grams per batch row and beam, which tree nodes do not map to",
    "watermarking_config": "watermarking processors keep state across calls, and tree nodes are scored speculatively",
    "token_healing": "token healing rewrites the prompt with the tokenizer before decoding",
}
# generate() arguments that need more than each node's history.
_REFUSED_ARGUMENTS = {
    "prefix_allowed_tokens_fn": "the function receives each row's batch index, which tree nodes do not map to",
    "negative_prompt_ids": _REFUSED_FIELDS["guidance_scale"],
    "negative_prompt_attention_mask": _REFUSED_FIELDS["guidance_scale"],
    "assistant_model": _ASSISTED,
}
_ARGUMENTS = {"attention_mask", "logits_processor", "stopping_criteria", "streamer", "use_cache", "tokenizer"}


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


def _refused(what: str, why: str) -> NotImplementedError:
    return NotImplementedError(
        f"propd generate does not support {what}: {why}; unset it, or call propd_compile.restore(model) "
        "to use the original generate"
    )


def _refuse_unsupported(gen: GenerationConfig, model_kwargs: dict[str, Any]) -> None:
    for name, why in _REFUSED_ARGUMENTS.items():
        if model_kwargs.get(name) is not None:
            raise _refused(name, why)
    mode = gen.get_generation_mode()
    if mode in _REFUSED_MODES:
        fields, why = _REFUSED_MODES[mode]
        chosen = ", ".join(f"{f}={getattr(gen, f)!r}" for f in fields if getattr(gen, f, None) is not None)
        raise _refused(f"{mode.value} ({chosen})", why)
    for name, why in _REFUSED_FIELDS.items():
        value = getattr(gen, name, None)
        if value not in (None, False, 0) and not (name == "guidance_scale" and value == 1):
            raise _refused(f"{name}={value!r}", why)
    if gen.return_dict_in_generate:
        for name in ("output_attentions", "output_hidden_states"):
            if getattr(gen, name):
                raise _refused(f"{name}=True", "tree verification returns no attentions or hidden states per emitted token")
    unknown = set(model_kwargs) - _ARGUMENTS - set(_REFUSED_ARGUMENTS) - {"output_attentions", "output_hidden_states"}
    if unknown:
        raise TypeError(f"propd generate got unsupported arguments: {sorted(unknown)}")


@dataclass
class _Call:
    """One `generate` call as HF's generate prepares it (rows expanded for num_return_sequences)."""

    gen: GenerationConfig
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    max_new_tokens: int
    eos_token_ids: list[int]
    pad_token_id: int
    processors: LogitsProcessorList
    stopping: StoppingCriteriaList | None
    streamer: Any


def _prepare(model: torch.nn.Module, input_ids: torch.Tensor, kwargs: dict[str, Any]) -> _Call:
    """What HF's `generate` prepares before decoding, by its own code, in its order."""
    user_gen = kwargs.pop("generation_config", None)
    unset = lambda field: (  # noqa: E731 - HF's has_default_max_length / has_default_min_length
        kwargs.get(field) is None and (user_gen is None or getattr(user_gen, field) is None)
        and getattr(model.generation_config, field) is None
    )
    default_max, default_min = unset("max_length"), unset("min_length")
    gen, model_kwargs = model._prepare_generation_config(user_gen, **kwargs)
    _refuse_unsupported(gen, model_kwargs)
    mask = model_kwargs.get("attention_mask")
    if mask is None:
        mask = torch.ones_like(input_ids)
    _check_prompt(input_ids, mask)
    B, P = input_ids.shape
    device = input_ids.device
    model._prepare_special_tokens(gen, model_kwargs.get("attention_mask") is not None, device=device, batch_size=B)
    prompt = input_ids
    if gen.num_return_sequences > 1:  # HF: every row repeated in place (sampling only; HF refuses it greedy)
        input_ids = input_ids.repeat_interleave(gen.num_return_sequences, 0)
        mask = mask.repeat_interleave(gen.num_return_sequences, 0)
    gen = model._prepare_generated_length(gen, default_max, default_min, "input_ids", P, input_ids)
    max_new = gen.max_length - P
    if max_new < 1:
        raise ValueError(f"nothing to generate: max_new_tokens={max_new} (prompt of {P} tokens, max_length={gen.max_length})")
    processors = model._get_logits_processor(
        gen, input_ids_seq_length=P, encoder_input_ids=prompt,
        logits_processor=model_kwargs.get("logits_processor") or LogitsProcessorList(), device=device,
        model_kwargs={"attention_mask": mask},
    )
    # HF's stopping criteria; the decode loop stops at EOS and max_new_tokens itself.
    stopping = model._get_stopping_criteria(
        gen, model_kwargs.get("stopping_criteria") or StoppingCriteriaList(), tokenizer=model_kwargs.get("tokenizer")
    )
    stopping = StoppingCriteriaList(c for c in stopping if type(c) not in (MaxLengthCriteria, EosTokenCriteria))
    eos = gen._eos_token_tensor
    eos_ids = [] if eos is None else eos.flatten().tolist()
    pad = gen._pad_token_tensor
    return _Call(
        gen, input_ids, mask, max_new, eos_ids, int(pad) if pad is not None else 0, processors,
        stopping or None, model_kwargs.get("streamer"),
    )


def propd_generate(
    model: torch.nn.Module,
    inputs: torch.Tensor | None = None,
    config: ProPDConfig | None = None,
    generator: torch.Generator | None = None,
    **kwargs: Any,
):
    """Token-identical to `model.generate(..., do_sample=False)` with the same arguments, decoded
    with token trees; with `do_sample=True`, distributed exactly as the model's sampling (unless
    config.acceptance is "typical"). `generator` seeds the draws; without it they come from
    torch's global RNG."""
    state = state_of(model)
    if state is None:
        raise RuntimeError("propd_generate needs an accelerated model: call propd_compile.accelerate(model) first")
    config = config or state.config
    input_ids = kwargs.pop("input_ids", inputs)
    if input_ids is None:
        raise ValueError("generate needs input_ids (a [batch, length] tensor of token ids)")
    if input_ids.dim() == 1:
        input_ids = input_ids[None]
    call = _prepare(model, input_ids, kwargs)
    gen = call.gen
    _check_context(model, int(call.attention_mask.sum(1).max()), call.max_new_tokens, config)

    out_scores = bool(gen.return_dict_in_generate and gen.output_scores)
    out_logits = bool(gen.return_dict_in_generate and gen.output_logits)
    process = None
    if call.processors or out_scores or out_logits:
        process = NodeProcessing(call.processors, call.input_ids, out_scores, out_logits)
    if gen.do_sample:
        accept = sampling_rule(generator, config.acceptance, config.posterior_threshold, config.posterior_alpha)
    else:
        accept = greedy_rule
    # plain decoding (one node per row) has nothing to plan: its loop stays as lean as a plain step
    planner = state.planner(config) if config.tree == "dynamic" and config.max_tree_nodes > 1 else None
    drafter = build_drafter(config, model, rank_stats=planner.acceptance.rank_stats if planner else None)
    taps = drafter.feature_layers
    forward = state.forward(config, hidden=drafter.needs_hidden, taps=taps)
    compiled = state.compiled(config, drafter.needs_hidden, taps)
    prefill = None
    if compiled and not config.prune:
        from propd_compile.runtime_compile import prefill_forward

        prefill = prefill_forward(model, forward, drafter.needs_hidden, taps)
    sequences, stats = tree_generate(
        model,
        call.input_ids,
        call.attention_mask,
        max_new_tokens=call.max_new_tokens,
        eos_token_ids=call.eos_token_ids,
        pad_token_id=call.pad_token_id,
        drafter=drafter,
        max_tree_nodes=config.max_tree_nodes,
        forward=forward,
        prefill=prefill,
        stopping_criteria=call.stopping,
        streamer=call.streamer,
        accept=accept,
        planner=planner,
        process=process,
        ragged=config.ragged,
    )
    stats.compiled = compiled
    state.stats = stats
    if gen.return_dict_in_generate:
        from transformers.generation.utils import GenerateDecoderOnlyOutput

        scores, logits = process.emitted(call.pad_token_id) if process is not None else (None, None)
        return GenerateDecoderOnlyOutput(sequences=sequences, scores=scores, logits=logits)
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
