"""The tree decoding loop (gpt-fast style: plain functions, tensors in and out).

One step per iteration: every unfinished row drafts a tree rooted at its last token, one forward
verifies all trees (tree mask, depth-based positions, runtime-owned KV cache), an acceptance rule
picks each row's accepted root-to-node path and the bonus token after it, and the cache keeps
exactly the accepted entries. The rule is a parameter: `greedy_rule` (here) accepts the longest
path whose every token equals the argmax of its parent's logits, so every emitted token is the
argmax given exactly the tokens before it, hence identical to plain greedy decoding;
`propd_compile.sampling` holds the sampling rules.
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Callable, Sequence

import torch

from propd_compile.cache import TreeKVCache
from propd_compile.drafters import Drafter
from propd_compile.planner import StepTimer, TreePlanner
from propd_compile.ragged import model_kwargs
from propd_compile.streaming import StepStreamer
from propd_compile.tree import TokenTree, TreeBatch

if TYPE_CHECKING:
    from propd_compile.processing import NodeProcessing

# forward(input_ids [B,T], mask [B,1,T,KV] bool, position_ids [B,T], cache, last_only=False)
#   -> logits [B,T,V] ([B,1,V] with last_only: the prefill needs only the last position's), or
#   (logits, final hidden states [B,T,H]) for forwards made with `hidden`
Forward = Callable[..., torch.Tensor | tuple[torch.Tensor, torch.Tensor]]
# accept(trees, logits [B,T,V]) -> (per row: accepted root-to-node path, bonus token after it)
AcceptRule = Callable[[TreeBatch, torch.Tensor], tuple[list[list[int]], list[int]]]
# cache slots a row may skip instead of moving its KV (`TreeKVCache.compact`): rows at different
# lengths then run plain steps without copies, for at most this many more slots of attention
GAP_SLOTS = 64


@dataclass
class DecodeStats:
    """What one `generate` call did. `mean_accepted` counts tokens per row and verification step,
    bonus included (plain greedy decoding scores 1.0); the prefill's first token is not a step."""

    new_tokens: int = 0
    steps: int = 0
    row_steps: int = 0
    mean_accepted: float = 0.0
    mean_tree_nodes: float = 0.0
    seconds: float = 0.0
    tree_sizes: list[int] = field(default_factory=list)
    accepted: list[int] = field(default_factory=list)
    rows: list[int] = field(default_factory=list)  # the batch row of each row step (per-row statistics)
    # dynamic trees: relative error of the latency model's prediction for each step, made before it ran
    latency_errors: list[float] = field(default_factory=list)
    # dynamic trees: (expected, accepted) tokens of each step over its rows, expected before it ran
    outcomes: list[tuple[float, int]] = field(default_factory=list)

    pruned_nodes: int = 0  # tree nodes an early-prune point kept out of the deep layers
    compiled: bool = False  # the verification ran compiled kernels
    draft_seconds: float = 0.0  # time in the drafters after the prefill (proposing, reading hidden states/features)
    plan_seconds: float = 0.0  # time in the planner choosing trees

    @property
    def tokens_per_second(self) -> float:
        return self.new_tokens / self.seconds if self.seconds > 0 else 0.0

    @property
    def pruned_fraction(self) -> float:
        """Fraction of the verified tree nodes that skipped the layers after the prune point."""
        total = sum(self.tree_sizes)
        return self.pruned_nodes / total if total else 0.0

    def summary(self) -> dict:
        out = {k: v for k, v in asdict(self).items() if k not in ("tree_sizes", "accepted", "rows", "latency_errors", "outcomes")}
        out["tokens_per_second"] = self.tokens_per_second
        out["pruned_fraction"] = self.pruned_fraction
        if self.latency_errors:
            out["latency_mape"] = sum(self.latency_errors) / len(self.latency_errors)
        return out


def eager_forward(model: torch.nn.Module, hidden: bool = False, taps: tuple[int, ...] = ()) -> Forward:
    """The model's own forward; with `hidden`, returns (logits, last hidden state) instead, and
    with `taps` (logits, last hidden state, tapped features). A ragged step (`cache.ragged`)
    runs on its packed nodes only and returns outputs in the padded [B, T] layout."""
    if hidden or taps:
        return hidden_forward(model, taps)

    def forward(input_ids, mask, position_ids, cache, last_only: bool = False):
        step, ids, pos = _packed(cache, input_ids, position_ids)
        logits = model(
            input_ids=ids, attention_mask=mask, position_ids=pos, cache=cache, use_cache=True,
            logits_to_keep=_kept(step, last_only), **model_kwargs(step),
        ).logits
        return _logits_layout(step, logits, input_ids.shape, last_only)

    return forward


def _kept(step, last_only: bool) -> int | torch.Tensor:
    """HF's `logits_to_keep`: all positions (0), the last (1), or with a packing each row's last."""
    if not last_only:
        return 0
    return 1 if step is None else step.pack[:, -1]


def _keep_positions(hidden: torch.Tensor, kept: int | torch.Tensor) -> torch.Tensor:
    """The positions HF's causal-LM forward projects for a `logits_to_keep` of `_kept`'s kinds
    (transformers before 5.20, which vLLM pins, has no public helper for it)."""
    return hidden[:, slice(-kept, None) if isinstance(kept, int) else kept]


def _logits_layout(step, logits: torch.Tensor, shape: tuple[int, int], last_only: bool) -> torch.Tensor:
    """Logits in the decode loop's layout: [B, T, V], or [B, 1, V] with `last_only`."""
    if step is None:
        return logits
    return logits[0][:, None] if last_only else step.unpack(logits, shape)


def _packed(cache, input_ids: torch.Tensor, position_ids: torch.Tensor):
    """(the step's packing or None, token ids, positions): packed [1, N] on a ragged step."""
    step = cache.ragged
    if step is None:
        return None, input_ids, position_ids
    return step, step.pack_tokens(input_ids), step.pack_tokens(position_ids)


def hidden_forward(model: torch.nn.Module, taps: tuple[int, ...] = ()) -> Forward:
    """(logits, hidden): the base model's final-norm hidden states and its LM head on them, which
    is what the causal-LM forward computes, so the hidden states cost nothing extra (drafters
    with `needs_hidden` use them; `heads.check_hidden_logits` refuses models that differ).
    With `taps`, also the hidden states entering those layers (HF `hidden_states` indices),
    concatenated: (logits, hidden, features [B, T, len(taps) * H]), for the feature drafter."""
    base, lm_head = model.base_model, model.get_output_embeddings()

    def forward(input_ids, mask, position_ids, cache, last_only: bool = False):
        step, ids, pos = _packed(cache, input_ids, position_ids)
        out = base(
            input_ids=ids, attention_mask=mask, position_ids=pos, cache=cache, use_cache=True,
            output_hidden_states=bool(taps), **model_kwargs(step),
        )
        h = out.last_hidden_state
        logits = lm_head(_keep_positions(h, _kept(step, last_only)))
        outs = [_logits_layout(step, logits, input_ids.shape, last_only), h]
        if taps:
            outs.append(torch.cat([out.hidden_states[t] for t in taps], -1))
        if step is not None:
            outs[1:] = [step.unpack(x, input_ids.shape) for x in outs[1:]]
        return tuple(outs)

    return forward


def greedy_accept(batch: TreeBatch, pred: torch.Tensor) -> list[list[int]]:
    """Per row, the accepted root-to-node path (node indices) given pred[b, i] = argmax after node i.

    Node c is accepted iff its parent is accepted and token(c) == pred[parent(c)]; siblings carry
    distinct tokens, so the accepted nodes form one chain from the root.
    """
    return batch.longest_paths(batch.tokens == pred.gather(1, batch.parents.clamp(min=0)))


def greedy_rule(batch: TreeBatch, logits: torch.Tensor) -> tuple[list[list[int]], list[int]]:
    """Greedy acceptance; the bonus token is the argmax after the last accepted node."""
    pred = logits.argmax(-1).cpu()
    paths = greedy_accept(batch, pred)
    return paths, [int(pred[b, path[-1]]) for b, path in enumerate(paths)]


def _prefill_mask(valid: torch.Tensor) -> torch.Tensor:
    """Causal + padding mask for a left-padded prompt; padding queries see themselves (no NaN rows)."""
    P = valid.shape[1]
    causal = torch.ones(P, P, dtype=torch.bool, device=valid.device).tril()
    eye = torch.eye(P, dtype=torch.bool, device=valid.device)
    return (causal & (valid[:, None, :] | eye))[:, None]


@torch.no_grad()
def tree_generate(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    *,
    max_new_tokens: int,
    eos_token_ids: Sequence[int],
    pad_token_id: int,
    drafter: Drafter,
    max_tree_nodes: int,
    forward: Forward | None = None,
    prefill: Forward | None = None,
    stopping_criteria: Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor] | None = None,
    streamer=None,
    accept: AcceptRule = greedy_rule,
    planner: TreePlanner | None = None,
    ragged: bool = False,
    process: NodeProcessing | None = None,
) -> tuple[torch.Tensor, DecodeStats]:
    """Decode a left-padded batch with token trees; returns (sequences [B, P + N], stats).

    `accept` decides what each step emits (greedy by default); the token after the prompt is the
    bonus token of a root-only tree, so the rule also picks it. With a `planner` (dynamic trees)
    the drafters propose up to `max_tree_nodes` nodes and the planner cuts every step's trees to
    the size it expects to be fastest, learning from each step's outcome and time (and skips
    drafting while it does not pay). `prefill` runs the prompt (default: the eager forward; a
    compiled one where it takes prompts). With `ragged` (the model's attention reads packings:
    `propd_compile.ragged`), the prefill computes no padding, and steps verify only each row's
    own tree, instead of every row padding to the largest tree. A row that finishes leaves the
    cache (`TreeKVCache.retire`), so the steps after it cost what a smaller batch costs.
    With `process` (logits processors) `accept` sees every node's logits processed on that
    node's history.
    """
    t0 = time.perf_counter()
    needs_hidden = getattr(drafter, "needs_hidden", False)
    taps = tuple(getattr(drafter, "feature_layers", ()) or ())
    forward = forward or eager_forward(model, hidden=needs_hidden, taps=taps)
    device = input_ids.device
    B, P = input_ids.shape
    eos = set(int(e) for e in eos_token_ids)
    valid_prompt = attention_mask.bool()
    cache = TreeKVCache.for_model(model, B, P + max_new_tokens + max_tree_nodes + 1, gap_slots=GAP_SLOTS)
    stats = DecodeStats()

    # Prefill: the whole prompt, logits of the last position only.
    n_real = valid_prompt.sum(1)
    pos = (valid_prompt.long().cumsum(1) - 1).clamp(min=0)
    mask = _prefill_mask(valid_prompt)
    cache.begin_step(mask, valid_prompt if ragged else None)  # ragged: the padding is not computed
    out = (prefill or eager_forward(model, hidden=needs_hidden, taps=taps))(input_ids, mask, pos, cache, last_only=True)
    logits, hidden, features = _outputs(out, needs_hidden, taps)
    logits = logits[:, -1]
    cache.end_step()
    _check_finite(logits)
    cache.commit_prefill(attention_mask)
    stream = StepStreamer(streamer, input_ids, pad_token_id) if streamer is not None else None

    rows = [input_ids[b][valid_prompt[b]].tolist() for b in range(B)]
    drafter.start(rows)
    generated: list[list[int]] = [[] for _ in range(B)]
    live = list(range(B))  # the batch row in each cache row (`TreeKVCache.retire` drops finished rows)
    if process is not None:
        accept = process.wrap(accept, generated, live)
    done = [False] * B
    n_real_l = n_real.tolist()

    def emit(b: int, tokens: list[int]) -> list[int]:
        """Append tokens to row b up to a stop; returns what was appended."""
        out = []
        for tok in tokens:
            generated[b].append(tok)
            out.append(tok)
            if (
                tok in eos
                or len(generated[b]) >= max_new_tokens
                or (
                    stopping_criteria is not None
                    and bool(stopping_criteria(torch.tensor([input_ids[b].tolist() + generated[b]]), None)[0])
                )
            ):
                done[b] = True
                break
        return out

    _, first = accept(TreeBatch.stack([TokenTree.root_only(int(t)) for t in input_ids[:, -1]]), logits[:, None])
    for b in range(B):
        appended = emit(b, [first[b]])
        drafter.advance(b, appended)
    t_draft = time.perf_counter()
    if needs_hidden:
        _give_hidden(drafter, live, done, hidden[:, -1], [-1] * B)
    if taps:
        _give_features(drafter, live, done, features, [valid_prompt[b].nonzero().flatten().tolist() for b in range(B)])
    prepared = time.perf_counter() - t_draft  # seconds the drafters spent preparing the next step
    if stream is not None:
        stream.update(generated, done)

    # whether this step drafts and plans, and with the drafters that read hidden states (a planner
    # leaves them out, then runs plain steps, while speculating does not pay)
    speculating, costly = True, needs_hidden
    while not all(done):
        # rows that finished leave the cache: a step neither computes nor attends over them
        finished = [i for i, b in enumerate(live) if done[b]]
        if finished:
            live[:] = [live[i] for i in cache.retire(finished)]
        L = len(live)
        W = cache.write_start
        if planner is not None and stats.steps == 0:
            planner.warm_up(model, forward, L, W)
            planner.start_call()
        t_step = time.perf_counter()
        proposing = planning = 0.0
        trees = [None] * L
        if speculating:
            trees = [drafter.propose(b, max_tree_nodes) for b in live]
            proposing = time.perf_counter() - t_step
            if planner is not None:
                t_plan = time.perf_counter()
                trees = planner.plan(trees, W, costly=costly)
                planning = time.perf_counter() - t_plan
        trees = [t if t is not None else TokenTree.root_only(generated[b][-1]) for t, b in zip(trees, live)]
        batch = TreeBatch.stack(trees, pad_token=pad_token_id)
        T = batch.num_nodes
        mask = torch.cat([cache.valid[:, None, :W].expand(L, T, W), batch.ancestors], dim=2)[:, None].to(device)
        positions = (torch.tensor([n_real_l[b] for b in live])[:, None] + batch.depths).to(device)
        nodes = batch.valid if ragged else None  # ragged: the forward runs only the real nodes
        tokens = int(nodes.sum()) if ragged else L * T
        cache.begin_step(mask, nodes)
        with StepTimer(device) as timer:
            out = forward(batch.tokens.to(device), mask, positions, cache)
        cache.end_step()
        logits, hidden, features = _outputs(out, needs_hidden, taps)
        _check_finite(logits)
        # Early pruning: nodes a prune point dropped (cache.keep False) are never accepted.
        kept = cache.keep[:, :T].cpu()
        batch = dataclasses.replace(batch, valid=batch.valid & kept)
        deep_rows = int(kept.sum(1).max())  # rows per batch row that ran the deep layers
        stats.pruned_nodes += sum(max(len(tree) - deep_rows, 0) for tree in trees)
        paths, bonus = accept(batch, logits)
        if planner is not None:
            n_errors, n_outcomes = len(planner.latency_errors), len(planner.outcomes)
            planner.observe(trees, paths, timer.seconds, L, T, W, kept=deep_rows, tokens=tokens)
            stats.latency_errors += planner.latency_errors[n_errors:]
            stats.outcomes += planner.outcomes[n_outcomes:]
        stats.steps += 1
        kept_nodes = {}
        for i, b in enumerate(live):
            path = paths[i]
            proposal = batch.tokens[i, path[1:]].tolist() + [bonus[i]]
            appended = emit(b, proposal)
            drafter.advance(b, appended)
            stats.row_steps += 1
            stats.tree_sizes.append(len(trees[i]))
            stats.accepted.append(len(appended))
            stats.rows.append(b)
            if not done[b]:
                kept_nodes[i] = path
                n_real_l[b] += len(path)
        cache.compact(W, kept_nodes)
        speculated, costly_before = speculating, costly
        speculating, costly = planner.next_step(done.count(False)) if planner is not None else (True, True)
        costly = costly and needs_hidden
        t_draft = time.perf_counter()
        if costly and speculating:
            _give_hidden(drafter, live, done, hidden, [path[-1] for path in paths])
        if taps:  # the feature drafter extends its own state from every verified step
            _give_features(drafter, live, done, features, paths)
        preparing = time.perf_counter() - t_draft
        stats.draft_seconds += proposing + preparing
        stats.plan_seconds += planning
        if stream is not None:
            stream.update(generated, done)
        if planner is not None:
            # this step's speculation: prepared after the last step, proposed and planned now
            speculation = prepared + proposing + planning if speculated else None
            around = time.perf_counter() - t_step - timer.seconds - proposing - planning - preparing
            planner.observe_overhead(tokens, around, L, speculation, costly=costly_before)
        prepared = preparing
    if stream is not None:
        stream.end(generated)

    N = max(len(g) for g in generated)
    out = torch.full((B, P + N), pad_token_id, dtype=input_ids.dtype, device=device)
    out[:, :P] = input_ids
    for b, g in enumerate(generated):
        out[b, P : P + len(g)] = torch.tensor(g, dtype=input_ids.dtype)
    stats.new_tokens = sum(len(g) for g in generated)
    stats.mean_accepted = sum(stats.accepted) / max(stats.row_steps, 1)
    stats.mean_tree_nodes = sum(stats.tree_sizes) / max(stats.row_steps, 1)
    stats.seconds = time.perf_counter() - t0
    return out, stats


def _outputs(out, hidden: bool, taps: tuple[int, ...]):
    """(logits, hidden or None, features or None) from what a forward returned."""
    if not (hidden or taps):
        return (out[0] if isinstance(out, tuple) else out), None, None
    if not isinstance(out, tuple) or len(out) < 2 + bool(taps):
        raise TypeError("the drafter needs hidden states: the forward must return (logits, hidden[, features])")
    return out[0], out[1], (out[2] if taps else None)


def _give_hidden(drafter: Drafter, live: list[int], done: list[bool], hidden: torch.Tensor, nodes: list[int]) -> None:
    """Hand each unfinished row its hidden state at `nodes[i]` (its last accepted node); cache
    row i of the step (`hidden[i]`) is batch row `live[i]`."""
    at = [i for i, b in enumerate(live) if not done[b]]
    if at:
        idx = torch.tensor(at, device=hidden.device)
        if hidden.dim() == 3:
            hidden = hidden[idx, torch.tensor([nodes[i] for i in at], device=hidden.device)]
        else:
            hidden = hidden[idx]
        drafter.set_hidden([live[i] for i in at], hidden)


def _give_features(drafter: Drafter, live: list[int], done: list[bool], features: torch.Tensor, nodes: list[list[int]]) -> None:
    """Hand each unfinished row its tapped features at `nodes[i]` (positions it just verified);
    cache row i of the step is batch row `live[i]`."""
    at = [i for i, b in enumerate(live) if not done[b]]
    if at:
        drafter.set_features(
            [live[i] for i in at], [features[i, torch.tensor(nodes[i], device=features.device)] for i in at]
        )


def _check_finite(logits: torch.Tensor) -> None:
    # one reduction: a NaN or an infinity anywhere makes the sum non-finite
    if not torch.isfinite(logits.sum(dtype=torch.float32)):
        raise FloatingPointError(
            "the model produced NaN/inf logits; check the weights and dtype (fp16 overflow: try "
            "torch_dtype=torch.float32 or bfloat16). Nothing was generated."
        )
