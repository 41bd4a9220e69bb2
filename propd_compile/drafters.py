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
    @abstractmethod
    def start(self, sequences: Sequence[Sequence[int]]) -> None:
        """Reset per-row state for a new batch; each sequence is one row's prompt (no padding)."""

    @abstractmethod
    def advance(self, row: int, tokens: Sequence[int]) -> None:
        """Tokens were appended to `row`'s sequence (emitted, verified)."""

    @abstractmethod
    def propose(self, row: int, budget: int) -> TokenTree:
        """A tree of at most `budget` nodes rooted at `row`'s last token."""


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

    def continuations(self, depth: int, per_n: int) -> list[tuple[list[int], float]]:
        """Continuations of the earlier occurrences of the current suffix, weighted n**2.

        Longer matching suffixes are stronger evidence; the most recent occurrences come first.
        """
        end = len(self.tokens)
        out: list[tuple[list[int], float]] = []
        for n in range(min(self.n_max, end), 0, -1):
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


class NGramDrafter(Drafter):
    """Training-free drafts from the prompt and the generated text (prompt lookup, ANPD-style).

    Every earlier occurrence of the current 1..n_max-token suffix proposes what followed it;
    the continuations merge into one trie, so disagreeing occurrences become sibling branches.
    A node's score is the share of evidence weight that agrees with its whole path.
    """

    def __init__(self, n_max: int = 4, max_depth: int = 6, per_n: int = 8, branching: bool = True) -> None:
        self.n_max, self.max_depth, self.per_n, self.branching = n_max, max_depth, per_n, branching
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
        paths = index.continuations(self.max_depth, self.per_n)
        if not paths:
            return TokenTree.root_only(root)
        if not self.branching:
            best = max(paths, key=lambda p: p[1])  # max keeps the first: longest n, most recent
            paths = [(best[0][: budget - 1], 1.0)]
        total = sum(w for _, w in paths)
        return TokenTree.from_paths(root, [(p, w / total) for p, w in paths], budget)


def build_drafter(config) -> Drafter:  # config: ProPDConfig (imported lazily to avoid a cycle)
    if config.tree == "chain":
        return NGramDrafter(config.ngram_max, config.max_depth, branching=False)
    return NGramDrafter(config.ngram_max, config.max_depth)
