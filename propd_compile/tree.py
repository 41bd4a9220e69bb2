"""Token trees: what one verification step checks.

Node 0 is the root: the last emitted token, whose KV is not cached yet. Every other node is a
drafted token whose parent precedes it (topological order), so a node's ancestors, depth and
root-to-node path follow from the parent array alone. Siblings never share a token: two equal
siblings would be verified twice for nothing.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch


@dataclass(frozen=True)
class TokenTree:
    tokens: tuple[int, ...]
    parents: tuple[int, ...]  # parents[0] == -1
    scores: tuple[float, ...]  # drafter confidence that the path to this node is accepted

    def __post_init__(self) -> None:
        n = len(self.tokens)
        if n == 0 or len(self.parents) != n or len(self.scores) != n:
            raise ValueError("a TokenTree needs a root and one parent and score per token")
        if self.parents[0] != -1:
            raise ValueError("node 0 must be the root (parent -1)")
        seen: set[tuple[int, int]] = set()
        for i in range(1, n):
            p = self.parents[i]
            if not 0 <= p < i:
                raise ValueError(f"node {i} has parent {p}: parents must precede their children")
            if (p, self.tokens[i]) in seen:
                raise ValueError(f"node {i} repeats token {self.tokens[i]} among its siblings")
            seen.add((p, self.tokens[i]))

    @classmethod
    def root_only(cls, token: int) -> "TokenTree":
        return cls((token,), (-1,), (1.0,))

    @classmethod
    def from_paths(cls, root: int, paths: Sequence[tuple[Sequence[int], float]], budget: int) -> "TokenTree":
        """Merge scored draft paths into a trie and keep the `budget` best nodes (root included).

        A node's score is the sum of the (non-negative) scores of the paths through it, so
        scores never grow along a path and a best-first pick is ancestor-closed. Ties keep the
        shallower node.
        """
        children: dict[tuple[int, int], int] = {}
        tokens, parents, scores, depth = [root], [-1], [1.0], [0]
        for path, score in paths:
            node = 0
            for tok in path:
                key = (node, int(tok))
                if key not in children:
                    children[key] = len(tokens)
                    tokens.append(int(tok))
                    parents.append(node)
                    scores.append(0.0)
                    depth.append(depth[node] + 1)
                node = children[key]
                scores[node] += float(score)
        # A parent was inserted before its child, and its score is >= the child's, so sorting
        # by (-score, depth, insertion order) keeps parents ahead of children.
        order = sorted(range(1, len(tokens)), key=lambda i: (-scores[i], depth[i], i))[: max(budget - 1, 0)]
        keep = sorted(order)
        new_index = {0: 0, **{old: k + 1 for k, old in enumerate(keep)}}
        return cls(
            (root, *(tokens[i] for i in keep)),
            (-1, *(new_index[parents[i]] for i in keep)),
            (1.0, *(scores[i] for i in keep)),
        )

    def __len__(self) -> int:
        return len(self.tokens)

    @property
    def depths(self) -> tuple[int, ...]:
        d = [0] * len(self)
        for i in range(1, len(self)):
            d[i] = d[self.parents[i]] + 1
        return tuple(d)

    def path(self, node: int) -> list[int]:
        """Node indices from the root to `node`, both included."""
        out = []
        while node != -1:
            out.append(node)
            node = self.parents[node]
        return out[::-1]

    def ancestor_mask(self) -> torch.Tensor:
        """[n, n] bool: row i is True at i and every ancestor of i."""
        n = len(self)
        mask = torch.eye(n, dtype=torch.bool)
        for i in range(1, n):
            mask[i] |= mask[self.parents[i]]
        return mask


@dataclass
class TreeBatch:
    """One tree per row, padded to a common node count.

    Padding nodes attend only to themselves, are nobody's ancestor and are never accepted.
    """

    tokens: torch.Tensor  # [B, T] long
    parents: torch.Tensor  # [B, T] long, -1 for roots and padding
    depths: torch.Tensor  # [B, T] long
    valid: torch.Tensor  # [B, T] bool
    ancestors: torch.Tensor  # [B, T, T] bool

    @classmethod
    def stack(cls, trees: Sequence[TokenTree], pad_token: int = 0) -> "TreeBatch":
        B, T = len(trees), max(len(t) for t in trees)
        tokens = torch.full((B, T), pad_token, dtype=torch.long)
        parents = torch.full((B, T), -1, dtype=torch.long)
        depths = torch.zeros((B, T), dtype=torch.long)
        valid = torch.zeros((B, T), dtype=torch.bool)
        ancestors = torch.eye(T, dtype=torch.bool).repeat(B, 1, 1)
        for b, tree in enumerate(trees):
            n = len(tree)
            tokens[b, :n] = torch.tensor(tree.tokens)
            parents[b, :n] = torch.tensor(tree.parents)
            depths[b, :n] = torch.tensor(tree.depths)
            valid[b, :n] = True
            ancestors[b, :n, :n] = tree.ancestor_mask()
        return cls(tokens, parents, depths, valid, ancestors)

    @property
    def num_nodes(self) -> int:
        return self.tokens.shape[1]
