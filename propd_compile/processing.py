"""Per-node logits processing: Hugging Face's logits processors on every node of a token tree.

HF's `generate` calls its processors with `input_ids` = the row's history (the prompt as given,
padding included, then the generated tokens) and turns the scores into the next token. In a
token tree every node has such a history too: its row's prompt and emitted tokens, then the
tokens on its root path after the root (the root is the last emitted token). Running each
processor on exactly that history gives every node the scores HF computes at that point, so the
greedy rule (argmax) stays token-identical and the sampling rule draws from HF's distribution.

Each processor gets the cheapest exact strategy its class allows (by exact type: a subclass may
override `__call__`):
- history-free (temperature, top-k/p, suppress_tokens, ...): one call on all nodes at once
  (encoder_repetition_penalty too, given the prompts of the rows in the batch);
- length-only (min_length, min_new_tokens, forced_eos, begin_suppress_tokens, ...): one call per
  distinct history length (a node's length is its row's plus its depth), no token history built;
- suffix-only (sequence_bias, bad_words_ids): one call on the last tokens of every node's history;
- repetition_penalty: a gather/scatter over each node's set of seen tokens (its row's set, kept
  up to date incrementally, plus its root path);
- no_repeat_ngram_size: each row's n-gram table, kept up to date incrementally, plus the n-grams
  that end on the node's root path;
- anything else (user processors): the generic fallback, one call per distinct history length
  with the full histories of those nodes as a batch. It is exact for processors that treat the
  rows of `input_ids` independently and keep no state between calls (they are also called on
  nodes that are never accepted); it is slower, since every call materializes full histories.
"""
from __future__ import annotations

import copy
from typing import Callable, Sequence

import torch
from transformers import LogitsProcessorList
from transformers.generation.logits_process import (
    EncoderRepetitionPenaltyLogitsProcessor,
    EpsilonLogitsWarper,
    EtaLogitsWarper,
    ExponentialDecayLengthPenalty,
    ForcedBOSTokenLogitsProcessor,
    ForcedEOSTokenLogitsProcessor,
    InfNanRemoveLogitsProcessor,
    LogitNormalization,
    MinLengthLogitsProcessor,
    MinNewTokensLengthLogitsProcessor,
    MinPLogitsWarper,
    NoBadWordsLogitsProcessor,
    NoRepeatNGramLogitsProcessor,
    RepetitionPenaltyLogitsProcessor,
    SequenceBiasLogitsProcessor,
    SuppressTokensAtBeginLogitsProcessor,
    SuppressTokensLogitsProcessor,
    TemperatureLogitsWarper,
    TopHLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
    TypicalLogitsWarper,
)

from propd_compile.decoding import AcceptRule
from propd_compile.tree import TreeBatch

# Output depends on the scores alone.
HISTORY_FREE = (
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
    SuppressTokensLogitsProcessor,
)
# Output depends on the scores and input_ids.shape[-1] only.
LENGTH_ONLY = (
    MinLengthLogitsProcessor,
    MinNewTokensLengthLogitsProcessor,
    ForcedEOSTokenLogitsProcessor,
    ForcedBOSTokenLogitsProcessor,
    SuppressTokensAtBeginLogitsProcessor,
    ExponentialDecayLengthPenalty,
)
# Output depends on the scores and the last (longest biased sequence - 1) tokens only.
SUFFIX_ONLY = (SequenceBiasLogitsProcessor, NoBadWordsLogitsProcessor)


class NodeHistories:
    """The exact history of every node of a TreeBatch, node-major (node n = row * T + index).

    A row's history is its prompt as HF sees it (padding included) and the tokens emitted so
    far; a node's history appends the tokens on its root path after the root. Row i of the batch
    is the call's batch row `rows[i]` (rows that finished may have left the batch)."""

    def __init__(
        self, prompt: Sequence[list[int]], generated: Sequence[list[int]], batch: TreeBatch, rows: Sequence[int]
    ) -> None:
        self.rows = list(rows)
        self.prompt, self.generated = [prompt[b] for b in rows], [generated[b] for b in rows]
        B, self.T = batch.tokens.shape
        tokens, parents = batch.tokens.tolist(), batch.parents.tolist()
        self.paths: list[list[list[int]]] = []  # [row][node]: the tokens after the root on its root path
        for b in range(B):
            paths: list[list[int]] = []
            for i, p in enumerate(parents[b]):
                paths.append(paths[p] + [tokens[b][i]] if p >= 0 else [])
            self.paths.append(paths)
        self.row_lengths = [len(p) + len(g) for p, g in zip(self.prompt, self.generated)]
        self.lengths = (torch.tensor(self.row_lengths)[:, None] + batch.depths).flatten()
        self.valid = batch.valid.flatten()
        self.valid_list = self.valid.tolist()

    def row_tokens(self, b: int, start: int) -> list[int]:
        """Row b's history from position `start` on."""
        P = len(self.prompt[b])
        return (self.prompt[b][start:] + self.generated[b]) if start < P else self.generated[b][start - P :]

    def row_tail(self, b: int, m: int) -> list[int]:
        """The last m tokens of row b's history (fewer if it is shorter)."""
        return self.row_tokens(b, max(self.row_lengths[b] - m, 0))

    def history(self, n: int) -> list[int]:
        b, i = divmod(n, self.T)
        return self.row_tokens(b, 0) + self.paths[b][i]

    def windows(self, nodes: list[int], m: int) -> torch.Tensor:
        """[len(nodes), m] long: the last m tokens of each node's history (each at least m long)."""
        rows = []
        for n in nodes:
            b, i = divmod(n, self.T)
            rows.append((self.row_tail(b, m) + self.paths[b][i])[-m:] if m else [])
        return torch.tensor(rows, dtype=torch.long).view(len(nodes), m)


NodeStep = Callable[[NodeHistories, torch.Tensor], torch.Tensor]  # (histories, scores [N, V]) -> scores


def _by_length(processor, histories: NodeHistories, scores: torch.Tensor, nodes: torch.Tensor, full: bool) -> torch.Tensor:
    """`processor` on `nodes`, one call per distinct history length; `full` passes the real
    histories, else a dummy of the right shape (for processors that read only the length)."""
    lengths = histories.lengths[nodes]
    for L in lengths.unique().tolist():
        idx = nodes[lengths == L]
        if full:
            ids = torch.tensor([histories.history(n) for n in idx.tolist()], dtype=torch.long).view(len(idx), L)
        else:
            ids = torch.zeros((1, 1), dtype=torch.long).expand(len(idx), L)
        scores[idx] = processor(ids.to(scores.device), scores[idx])
    return scores


def _generic(processor) -> NodeStep:
    def step(h: NodeHistories, scores: torch.Tensor) -> torch.Tensor:
        return _by_length(processor, h, scores, h.valid.nonzero().flatten(), full=True)

    return step


def _history_free(processor) -> NodeStep:
    def step(h: NodeHistories, scores: torch.Tensor) -> torch.Tensor:
        return processor(torch.zeros((scores.shape[0], 0), dtype=torch.long, device=scores.device), scores)

    return step


def _encoder_repetition(processor: EncoderRepetitionPenaltyLogitsProcessor) -> NodeStep:
    """The encoder penalty reads its batch row's prompt: HF repeats the prompt rows to the number
    of scored rows, so it is called with the prompts of the rows in the batch."""
    def step(h: NodeHistories, scores: torch.Tensor) -> torch.Tensor:
        these = copy.copy(processor)
        these.encoder_input_ids = processor.encoder_input_ids[torch.tensor(h.rows, device=processor.encoder_input_ids.device)]
        return these(torch.zeros((scores.shape[0], 0), dtype=torch.long, device=scores.device), scores)

    return step


def _length_only(processor) -> NodeStep:
    def step(h: NodeHistories, scores: torch.Tensor) -> torch.Tensor:
        return _by_length(processor, h, scores, torch.arange(scores.shape[0]), full=False)

    return step


def _suffix_length(processor: SequenceBiasLogitsProcessor) -> int:
    """How many of the last tokens the processor reads: its longest biased sequence but one."""
    return max((len(seq) for seq in processor.sequence_bias), default=1) - 1


def _suffix_only(processor: SequenceBiasLogitsProcessor) -> NodeStep:
    m = _suffix_length(processor)

    def step(h: NodeHistories, scores: torch.Tensor) -> torch.Tensor:
        long_enough = h.lengths >= m
        nodes = long_enough.nonzero().flatten()
        if len(nodes) == scores.shape[0]:
            return processor(h.windows(nodes.tolist(), m).to(scores.device), scores)
        scores[nodes] = processor(h.windows(nodes.tolist(), m).to(scores.device), scores[nodes])
        return _by_length(processor, h, scores, (~long_enough & h.valid).nonzero().flatten(), full=True)

    return step


class _RepetitionPenalty:
    """HF's repetition penalty: every token seen in the history (after `prompt_ignore_length`
    leading tokens) has its score divided by the penalty (multiplied, if negative), once."""

    def __init__(self, processor: RepetitionPenaltyLogitsProcessor, rows: int) -> None:
        self.penalty = processor.penalty
        ignore = processor.prompt_ignore_length
        if isinstance(ignore, torch.Tensor):
            if ignore.shape[0] != rows:
                raise ValueError("Incompatible `prompt_ignore_length` batch size")
            self.ignore = ignore.tolist()
        else:
            self.ignore = [int(ignore or 0)] * rows
        self.seen: list[set[int]] = [set() for _ in range(rows)]
        self.consumed = [0] * rows  # history positions already in `seen`

    def __call__(self, h: NodeHistories, scores: torch.Tensor) -> torch.Tensor:
        N, V = scores.shape
        node_rows, node_tokens = [], []
        for b, L in enumerate(h.row_lengths):
            r = h.rows[b]  # this row's state
            start = max(self.consumed[r], self.ignore[r])
            if start < L:
                self.seen[r].update(t for t in h.row_tokens(b, start) if t < V)
            self.consumed[r] = max(self.consumed[r], L)
            seen = torch.tensor(sorted(self.seen[r]), dtype=torch.long)
            nodes = torch.arange(b * h.T, (b + 1) * h.T)
            node_rows.append(nodes.repeat_interleave(len(seen)))
            node_tokens.append(seen.repeat(h.T))
            path_rows, path_tokens = [], []
            for i, path in enumerate(h.paths[b]):
                for k, t in enumerate(path):  # path token k sits at history position L + k
                    if t < V and L + k >= self.ignore[r]:
                        path_rows.append(b * h.T + i)
                        path_tokens.append(t)
            node_rows.append(torch.tensor(path_rows, dtype=torch.long))
            node_tokens.append(torch.tensor(path_tokens, dtype=torch.long))
        rows = torch.cat(node_rows).to(scores.device)
        tokens = torch.cat(node_tokens).to(scores.device)
        # a token on the path and in the row's set appears twice: both writes carry the same value
        score = scores[rows, tokens]
        scores[rows, tokens] = torch.where(score < 0, score * self.penalty, score / self.penalty)
        return scores


class _NoRepeatNGram:
    """HF's no_repeat_ngram_size: a token that would complete an n-gram already in the history
    scores -inf. Each row keeps a table (n-1 tokens -> tokens that followed them)."""

    def __init__(self, processor: NoRepeatNGramLogitsProcessor, rows: int) -> None:
        self.n = processor.ngram_size
        self.tables: list[dict[tuple[int, ...], set[int]]] = [{} for _ in range(rows)]
        self.consumed = [0] * rows  # n-grams ending before this history position are in the table

    def __call__(self, h: NodeHistories, scores: torch.Tensor) -> torch.Tensor:
        n, V = self.n, scores.shape[1]
        banned_rows, banned_tokens = [], []
        for b, L in enumerate(h.row_lengths):
            r = h.rows[b]  # this row's state
            table = self.tables[r]
            first_end = max(self.consumed[r], n - 1)  # the first n-gram ends at position n - 1
            if first_end < L:
                start = first_end - (n - 1)
                toks = h.row_tokens(b, start)
                for e in range(n - 1, len(toks)):
                    table.setdefault(tuple(toks[e - n + 1 : e]), set()).add(toks[e])
            self.consumed[r] = max(self.consumed[r], L)
            tail = h.row_tail(b, n - 1)
            for i, path in enumerate(h.paths[b]):
                if L + len(path) < n or not h.valid_list[b * h.T + i]:
                    continue
                seq = tail + path
                prefix = tuple(seq[len(seq) - n + 1 :]) if n > 1 else ()
                banned = set(table.get(prefix, ()))
                for e in range(max(len(tail), n - 1), len(seq)):  # n-grams ending on the path
                    if tuple(seq[e - n + 1 : e]) == prefix:
                        banned.add(seq[e])
                banned_rows += [b * h.T + i] * len(banned)
                banned_tokens += banned
        keep = [k for k, t in enumerate(banned_tokens) if t < V]
        if keep:
            rows = torch.tensor([banned_rows[k] for k in keep], device=scores.device)
            tokens = torch.tensor([banned_tokens[k] for k in keep], device=scores.device)
            scores[rows, tokens] = -float("inf")
        return scores


def node_step(processor, rows: int) -> NodeStep:
    """The exact per-node strategy for one processor (see the module docstring)."""
    kind = type(processor)
    if kind is RepetitionPenaltyLogitsProcessor:
        return _RepetitionPenalty(processor, rows)
    if kind is NoRepeatNGramLogitsProcessor:
        return _NoRepeatNGram(processor, rows)
    if kind is EncoderRepetitionPenaltyLogitsProcessor:
        return _encoder_repetition(processor)
    if kind in HISTORY_FREE:
        return _history_free(processor)
    if kind in LENGTH_ONLY:
        return _length_only(processor)
    if kind in SUFFIX_ONLY:
        return _suffix_only(processor) if _suffix_length(processor) else _history_free(processor)
    return _generic(processor)


class NodeProcessing:
    """The processors of one `generate` call, applied per tree node (`tree_generate(process=...)`).

    `prompt` [B, P] is the prompt exactly as HF's processors see it (left padding included). With
    `record_scores` / `record_logits` it keeps, per row, the processed scores / raw logits of every
    emitted token: what HF's `output_scores` / `output_logits` return (see `emitted`)."""

    def __init__(
        self, processors: LogitsProcessorList, prompt: torch.Tensor, record_scores: bool = False, record_logits: bool = False
    ) -> None:
        self.prompt = prompt.tolist()
        self.steps = [node_step(p, len(self.prompt)) for p in processors]
        self.record_scores, self.record_logits = record_scores, record_logits
        self.records: list[list[tuple[torch.Tensor | None, torch.Tensor | None]]] = [[] for _ in self.prompt]

    def __call__(
        self, batch: TreeBatch, logits: torch.Tensor, generated: Sequence[list[int]], rows: Sequence[int] | None = None
    ) -> torch.Tensor:
        """float32 scores [B, T, V]: node (b, i)'s logits processed on its exact history; row b
        of the batch is the call's row `rows[b]` (default: every row, in order)."""
        B, T, V = logits.shape
        scores = logits.reshape(B * T, V).to(torch.float32, copy=True)  # as HF: float32, raw logits kept
        if self.steps:
            histories = NodeHistories(self.prompt, generated, batch, range(B) if rows is None else rows)
            for step in self.steps:
                scores = step(histories, scores)
        return scores.view(B, T, V)

    def wrap(self, accept: AcceptRule, generated: Sequence[list[int]], live: Sequence[int] | None = None) -> AcceptRule:
        """`accept` on processed scores. `generated` is the decode loop's live per-row list of
        emitted tokens: every tree it verifies is rooted at its row's last history token. `live`,
        kept up to date by the loop, is the call's row in each batch row it verifies (default:
        every row, in order)."""
        self.generated = generated

        def rule(batch: TreeBatch, logits: torch.Tensor) -> tuple[list[list[int]], list[int]]:
            rows = range(len(generated)) if live is None else live
            last = [generated[b][-1] if generated[b] else self.prompt[b][-1] for b in rows]
            if batch.tokens[:, 0].tolist() != last:
                raise RuntimeError("per-node processing: a tree is not rooted at its row's last emitted token")
            scores = self(batch, logits, generated, rows)
            paths, bonus = accept(batch, scores)
            if self.record_scores or self.record_logits:
                for i, path in enumerate(paths):
                    b, at = rows[i], torch.tensor(path, device=scores.device)
                    self.records[b].append((
                        scores[i, at] if self.record_scores else None,
                        logits[i, at].float() if self.record_logits else None,
                    ))
            return paths, bonus

        return rule

    def emitted(self, pad_token_id: int) -> tuple[tuple | None, tuple | None]:
        """(scores, logits) of the decode `wrap` served, as HF returns them: one [B, V] float32
        tensor per generated position.
        A row that stopped earlier has no verification after its end; there its entries are
        -inf except 0 at the padding token its sequence holds (log-probability 0, as certain)."""
        generated = self.generated
        N = max(len(g) for g in generated)

        def stack(which: int) -> tuple[torch.Tensor, ...]:
            rows = []
            for b, g in enumerate(generated):
                got = torch.cat([r[which] for r in self.records[b]])[: len(g)]
                if len(g) < N:
                    fill = torch.full((N - len(g), got.shape[1]), -float("inf"), device=got.device)
                    fill[:, pad_token_id] = 0.0
                    got = torch.cat([got, fill])
                rows.append(got)
            return tuple(torch.stack(rows, 1).unbind(0))

        return (stack(0) if self.record_scores else None), (stack(1) if self.record_logits else None)
