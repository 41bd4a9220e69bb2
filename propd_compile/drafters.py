"""Drafters propose token trees; the model verifies them.

All drafters share one small interface so that heads and other sources plug in beside the
training-free n-gram drafter: `start` sees each row's prompt, `advance` each row's newly
emitted tokens, `propose` returns one scored tree per row whose root is the row's last token.
A drafter only affects speed, never the output: verification decides what is accepted.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Sequence

from propd_compile.tree import TokenTree


class Drafter(ABC):
    # Drafters that read the base model's last hidden state (draft heads) set this; the decode
    # loop then calls `set_hidden` after every step with the hidden state of each unfinished
    # row's last accepted node (the one whose logits gave the row's newest token).
    needs_hidden: bool = False

    def set_hidden(self, rows: Sequence[int], hidden) -> None:
        """hidden [len(rows), H]: the final-norm hidden state that predicted each row's last token."""

    # Drafters that read the hidden states entering some decoder layers (the feature drafter)
    # name them here (HF `hidden_states` indices); the verification forward then returns them for
    # every tree node, and the decode loop calls `set_features` with each unfinished row's
    # features at the positions it just verified (the prompt after the prefill, then every
    # accepted path), after `advance` has appended the tokens that follow them.
    feature_layers: tuple[int, ...] = ()

    def set_features(self, rows: Sequence[int], features) -> None:
        """features[i] [n_i, len(feature_layers) * H]: rows[i]'s next n_i verified positions."""

    @abstractmethod
    def start(self, sequences: Sequence[Sequence[int]]) -> None:
        """Reset per-row state for a new batch; each sequence is one row's prompt (no padding)."""

    @abstractmethod
    def advance(self, row: int, tokens: Sequence[int]) -> None:
        """Tokens were appended to `row`'s sequence (emitted, verified)."""

    @abstractmethod
    def propose(self, row: int, budget: int) -> TokenTree:
        """A tree of at most `budget` nodes rooted at `row`'s last token."""


class NoDrafter(Drafter):
    """Root-only trees: plain one-token steps (max_tree_nodes=1), with no drafting work at all."""

    def start(self, sequences: Sequence[Sequence[int]]) -> None:
        self.last = [int(s[-1]) for s in sequences]

    def advance(self, row: int, tokens: Sequence[int]) -> None:
        if tokens:
            self.last[row] = int(tokens[-1])

    def propose(self, row: int, budget: int) -> TokenTree:
        return TokenTree.root_only(self.last[row])


class _SuffixIndex:
    """Positions following every n-gram (n <= n_max) of one growing token sequence."""

    def __init__(self, n_max: int) -> None:
        self.n_max = n_max
        self.tokens: list[int] = []
        self.follow: list[dict[tuple[int, ...], list[int]]] = [{} for _ in range(n_max + 1)]

    def extend(self, tokens: Sequence[int]) -> None:
        for tok in tokens:
            self.tokens.append(int(tok))
            end = len(self.tokens)
            for n in range(1, min(self.n_max, end) + 1):
                self.follow[n].setdefault(tuple(self.tokens[end - n : end]), []).append(end)

    def continuations(self, depth: int, per_n: int, n_min: int = 1) -> list[tuple[list[int], float]]:
        """Continuations of the earlier occurrences of the current suffix, weighted n**2.

        Longer matching suffixes are stronger evidence; the most recent occurrences come first.
        """
        end = len(self.tokens)
        out: list[tuple[list[int], float]] = []
        for n in range(min(self.n_max, end), n_min - 1, -1):
            starts = self.follow[n].get(tuple(self.tokens[end - n :]), [])
            taken = 0
            for s in reversed(starts):
                if s >= end:
                    continue  # the suffix itself: nothing follows it yet
                cont = self.tokens[s : s + depth]
                if cont:
                    out.append((cont, float(n * n)))
                    taken += 1
                    if taken == per_n:
                        break
        return out


def _shares(paths: list[tuple[list[int], float]], total: float) -> list[tuple[list[int], float]]:
    """`paths` with their weights rescaled to sum to `total`."""
    weight = sum(w for _, w in paths)
    return [(p, total * w / weight) for p, w in paths] if weight > 0 else []


class NGramDrafter(Drafter):
    """Training-free drafts from the prompt and the generated text (prompt lookup, ANPD-style).

    Every earlier occurrence of the current 1..n_max-token suffix proposes what followed it;
    the continuations merge into one trie, so disagreeing occurrences become sibling branches.
    A node's score is the share of evidence weight that agrees with its whole path. With a
    phrase corpus (`propd_compile.phrases`), the suffix is also looked up in the model's own
    earlier answers to other prompts.
    """

    def __init__(
        self, n_max: int = 4, max_depth: int = 6, per_n: int = 8, branching: bool = True, n_min: int = 1,
        phrases=None, phrase_weight: float = 0.3,
    ) -> None:
        self.n_max, self.max_depth, self.per_n, self.branching, self.n_min = n_max, max_depth, per_n, branching, n_min
        # phrases.PhraseIndex of the model's own answers: its continuations weigh `phrase_weight`
        # against the row's own matches' 1 (a node's score is its share of the evidence), and at
        # most `phrase_weight` when the row's own text has no match
        self.phrases, self.phrase_weight = phrases, phrase_weight
        self.rows: list[_SuffixIndex] = []

    def start(self, sequences: Sequence[Sequence[int]]) -> None:
        self.rows = []
        for seq in sequences:
            index = _SuffixIndex(self.n_max)
            index.extend(seq)
            self.rows.append(index)

    def advance(self, row: int, tokens: Sequence[int]) -> None:
        self.rows[row].extend(tokens)

    def propose(self, row: int, budget: int) -> TokenTree:
        index = self.rows[row]
        root = index.tokens[-1]
        if budget <= 1 or self.max_depth == 0:
            return TokenTree.root_only(root)
        paths = index.continuations(self.max_depth, self.per_n, self.n_min)
        if not self.branching:
            if not paths:
                return TokenTree.root_only(root)
            best = max(paths, key=lambda p: p[1])  # max keeps the first: longest n, most recent
            return TokenTree.from_paths(root, [(best[0][: budget - 1], 1.0)], budget)
        scored = _shares(paths, 1.0)
        if self.phrases is not None:
            scored += _shares(self.phrases.continuations(index.tokens, self.max_depth, self.per_n), self.phrase_weight)
            if sum(w for _, w in scored) > 1.0:  # both matched: shares of all the evidence
                scored = _shares(scored, 1.0)
        if not scored:
            return TokenTree.root_only(root)
        return TokenTree.from_paths(root, scored, budget)


class HeadsDrafter(Drafter):
    """Drafts from Medusa heads (`propd_compile.heads`) on the last accepted node's hidden state.

    Head d's top-k tokens are the candidates at depth d + 1 below the root (the root is the row's
    newest token, which the base LM head on the same hidden state produced). Dynamic trees take
    the node-budget paths with the largest products of head softmax probabilities, best first;
    `static_paths` (Medusa's fixed sparse tree, rank paths from calibrated accuracies) fixes the
    shape and fills in each step's rank-r tokens.
    """

    needs_hidden = True

    def __init__(
        self, heads, lm_head, max_depth: int, topk: int = 8, static_paths=None, embed=None, rank_stats=None
    ) -> None:
        if heads.root_token and embed is None:
            raise ValueError("these heads read the root token: pass embed=model.get_input_embeddings()")
        self.heads, self.lm_head, self.embed = heads, lm_head, embed
        self.depth = min(heads.num_heads, max_depth)
        if static_paths is not None:
            self.depth = min(self.depth, max((len(p) for p, _ in static_paths), default=0))
            static_paths = [(p, s) for p, s in static_paths if len(p) <= self.depth]  # ancestors come first
            topk = max((max(p) + 1 for p, _ in static_paths), default=1)
        self.topk, self.static_paths = topk, static_paths
        self.rank_stats = rank_stats  # acceptance.RankStats (ProPD's P_k^i), updated from verified tokens
        self._calls = 0
        self.last: list[int] = []
        self.top: list[tuple[list[list[float]], list[list[int]]] | None] = []

    def start(self, sequences: Sequence[Sequence[int]]) -> None:
        self.last = [int(s[-1]) for s in sequences]
        self.top = [None] * len(sequences)

    def advance(self, row: int, tokens: Sequence[int]) -> None:
        top = self.top[row] if self.top else None
        if self.rank_stats is not None and top is not None:
            # tokens[d] is the verified token at depth d + 1 of the tree drafted from `top`: head d's target
            for d in range(min(len(top[1]), len(tokens))):
                ids = top[1][d]
                self.rank_stats.observe(d, ids.index(tokens[d]) if tokens[d] in ids else None)
        if tokens:
            self.last[row] = int(tokens[-1])
            self.top[row] = None  # the hidden state for the new root comes with set_hidden

    def set_hidden(self, rows: Sequence[int], hidden) -> None:
        import torch

        depth = self._useful_depth()
        if depth == 0 or not rows:
            return
        with torch.no_grad():
            root = None
            if self.heads.root_token:
                root = self.embed(torch.tensor([self.last[r] for r in rows], device=hidden.device))
            logits, vocab = self.heads.draft_logits(hidden, self.lm_head, num_heads=depth, root=root, packed=True)  # [R, D, V']
            probs, ids = logits.float().softmax(-1).topk(min(self.topk, logits.shape[-1]), dim=-1)
            if vocab is not None:
                ids = vocab[ids]
        probs, ids = probs.cpu().tolist(), ids.cpu().tolist()
        for i, row in enumerate(rows):
            self.top[row] = (probs[i], ids[i])

    # With rank statistics, heads that have not been right lately are skipped (they cost an LM-head
    # product each per row and step) and consulted again every PROBE_EVERY steps, to notice recovery.
    MIN_HIT = 0.03
    PROBE_EVERY = 16

    def _useful_depth(self) -> int:
        if self.rank_stats is None or self.static_paths is not None:
            return self.depth
        self._calls += 1
        if self._calls % self.PROBE_EVERY == 0:
            return self.depth
        depth = 0
        while depth < min(self.depth, self.rank_stats.num_heads):
            if sum(self.rank_stats.p(depth, r) for r in range(self.rank_stats.ranks)) < self.MIN_HIT:
                break
            depth += 1
        return depth

    def propose(self, row: int, budget: int) -> TokenTree:
        from propd_compile.heads import rank_paths

        root, top = self.last[row], self.top[row]
        if budget <= 1 or top is None:
            return TokenTree.root_only(root)
        probs, ids = top
        paths = self.static_paths[: budget - 1] if self.static_paths is not None else rank_paths(probs, budget)
        return TokenTree.from_rank_paths(root, paths, ids)


class FusedDrafter(Drafter):
    """Several drafters' trees merged into one by token path (`TokenTree.merge`)."""

    def __init__(self, drafters: Sequence[Drafter]) -> None:
        self.drafters = list(drafters)
        self.needs_hidden = any(d.needs_hidden for d in self.drafters)
        layers = {d.feature_layers for d in self.drafters if d.feature_layers}
        if len(layers) > 1:
            raise ValueError(f"fused drafters read different feature layers {sorted(layers)}; fuse at most one feature drafter")
        self.feature_layers = layers.pop() if layers else ()

    def start(self, sequences: Sequence[Sequence[int]]) -> None:
        for d in self.drafters:
            d.start(sequences)

    def advance(self, row: int, tokens: Sequence[int]) -> None:
        for d in self.drafters:
            d.advance(row, tokens)

    def set_hidden(self, rows: Sequence[int], hidden) -> None:
        for d in self.drafters:
            if d.needs_hidden:
                d.set_hidden(rows, hidden)

    def set_features(self, rows: Sequence[int], features) -> None:
        for d in self.drafters:
            if d.feature_layers:
                d.set_features(rows, features)

    def propose(self, row: int, budget: int) -> TokenTree:
        return TokenTree.merge([d.propose(row, budget) for d in self.drafters], budget)


def drafter_names(config, model=None) -> tuple[str, ...]:
    """The drafters `config` fuses: its `drafters`, or by default the feature drafter (given or
    shipped for `model`) with n-gram drafts, else draft heads with n-gram drafts, else n-gram."""
    if config.drafters is not None:
        return tuple(config.drafters)
    if model is not None:
        from propd_compile.feature_drafter import resolve_drafter

        if resolve_drafter(model, config.drafter) is not None:
            return ("feature", "ngram")
    return ("heads", "ngram")


def heads_for(config, model=None):
    """The draft heads `config` uses with `model` (None: no heads); refuses configs that need
    heads when there are none."""
    if config.tree == "chain":
        return None
    heads = None
    if config.tree == "medusa" or "heads" in drafter_names(config, model):
        from propd_compile.heads import resolve_heads

        heads = resolve_heads(model, config.heads) if model is not None else None
    if config.tree == "medusa" or (config.drafters is not None and "heads" in config.drafters):
        if heads is None:
            raise ValueError(
                "draft heads are needed (tree='medusa' or drafters with 'heads') but none were found for this model; "
                "train them with `propd train-heads --model NAME --out DIR` and pass ProPDConfig(heads=DIR)"
            )
    return heads


def build_drafter(config, model=None, rank_stats=None) -> Drafter:  # config: ProPDConfig (lazy import: no cycle)
    """The drafter for `config`; draft heads need the `model` (they use its LM head).

    drafters=None picks ("heads", "ngram") when heads are available (config.heads, or heads
    shipped for this model), else ("ngram",); tree="medusa" is the static Medusa tree alone;
    max_tree_nodes=1 (plain decoding) drafts nothing.
    `rank_stats` (acceptance.RankStats), if given, is updated by the heads from verified tokens.
    """
    if config.max_tree_nodes == 1:
        return NoDrafter()
    if config.tree == "chain":
        return NGramDrafter(config.ngram_max, config.max_depth, branching=False)
    heads = heads_for(config, model)
    lm_head = model.get_output_embeddings() if heads is not None else None
    embed = model.get_input_embeddings() if heads is not None else None
    if config.tree == "medusa":
        acc = (heads.accuracy or {}).get("rank_accuracy")
        if not acc:
            raise ValueError("tree='medusa' needs calibrated accuracies (accuracy.json beside the heads, written by train-heads)")
        from propd_compile.heads import rank_paths

        static = rank_paths(acc, config.max_tree_nodes)
        return HeadsDrafter(heads, lm_head, config.max_depth, static_paths=static, embed=embed)
    names = drafter_names(config, model)
    if config.drafters is None and names == ("heads", "ngram") and heads is None:
        names = ("ngram",)
    made = {
        "feature": lambda: feature_drafter_for(config, model),
        "ngram": lambda: NGramDrafter(config.ngram_max, config.max_depth, phrases=phrase_index(config, model)),
        "heads": lambda: HeadsDrafter(
            heads, lm_head, config.max_depth, topk=config.heads_topk, embed=embed, rank_stats=rank_stats
        ),
    }
    drafters = [made[n]() for n in names]
    return drafters[0] if len(drafters) == 1 else FusedDrafter(drafters)



def phrase_index(config, model=None):
    """The index of the phrase corpus `config` names (or the one shipped for `model`), or None."""
    if model is None or config.phrases is False:
        return None
    from propd_compile.phrases import resolve_phrases

    phrases = resolve_phrases(model, config.phrases)
    return phrases.index(config.ngram_max) if phrases is not None else None


def feature_drafter_for(config, model) -> Drafter:
    """The feature drafter `config` names (or the one shipped for `model`); refused when none."""
    from propd_compile.feature_drafter import FeatureDrafter, resolve_drafter

    draft = resolve_drafter(model, config.drafter) if model is not None else None
    if draft is None:
        raise ValueError(
            "drafters with 'feature' need a feature drafter, but none was found for this model; train one with "
            "`propd train-drafter --model NAME --out DIR` and pass ProPDConfig(drafter=DIR)"
        )
    return FeatureDrafter(draft, config.max_depth, topk=config.drafter_topk, frontier=config.drafter_topk)
