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
    # the rank among its head's candidates of a node the draft heads proposed, else -1 (None: all -1)
    ranks: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        n = len(self.tokens)
        if n == 0 or len(self.parents) != n or len(self.scores) != n or (self.ranks is not None and len(self.ranks) != n):
            raise ValueError("a TokenTree needs a root and one parent and score (and rank, if any) per token")
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
        return cls._best(tokens, parents, scores, depth, budget)

    @classmethod
    def _best(
        cls, tokens: list[int], parents: list[int], scores: list[float], depth: list[int], budget: int,
        ranks: list[int] | None = None,
    ) -> "TokenTree":
        """The `budget` best nodes of a trie (root included) whose scores never grow along a path."""
        # A parent was inserted before its child, and its score is >= the child's, so sorting
        # by (-score, depth, insertion order) keeps parents ahead of children.
        order = sorted(range(1, len(tokens)), key=lambda i: (-scores[i], depth[i], i))[: max(budget - 1, 0)]
        keep = sorted(order)
        new_index = {0: 0, **{old: k + 1 for k, old in enumerate(keep)}}
        return cls(
            (tokens[0], *(tokens[i] for i in keep)),
            (-1, *(new_index[parents[i]] for i in keep)),
            (1.0, *(scores[i] for i in keep)),
            None if ranks is None else (-1, *(ranks[i] for i in keep)),
        )

    @classmethod
    def from_rank_paths(
        cls, root: int, paths: Sequence[tuple[Sequence[int], float]], table: Sequence[Sequence[int]]
    ) -> "TokenTree":
        """A tree from scored rank paths (parents before children, every prefix present), where
        the node reached by ranks (r0, ..., rd) carries token table[d][rd].

        Drafters whose candidates per depth do not depend on the path (Medusa heads: table[d] is
        head d's top-k) describe a tree this way; distinct tokens per depth keep siblings distinct.
        """
        index: dict[tuple[int, ...], int] = {(): 0}
        tokens, parents, scores, ranks = [root], [-1], [1.0], [-1]
        for path, score in paths:
            path = tuple(path)
            index[path] = len(tokens)
            tokens.append(int(table[len(path) - 1][path[-1]]))
            parents.append(index[path[:-1]])
            scores.append(float(score))
            ranks.append(int(path[-1]))
        return cls(tuple(tokens), tuple(parents), tuple(scores), tuple(ranks))

    @classmethod
    def merge(cls, trees: Sequence["TokenTree"], budget: int) -> "TokenTree":
        """Merge trees with the same root by token path and keep the `budget` best nodes.

        A node drafted by several trees scores 1 - prod(1 - s) over their scores (each in
        [0, 1]): the chance that at least one source is right, if they erred independently.
        That is monotone in every score, so scores still never grow along a path.
        """
        if not trees:
            raise ValueError("TokenTree.merge needs at least one tree")
        root = trees[0].tokens[0]
        if any(t.tokens[0] != root for t in trees):
            raise ValueError("TokenTree.merge: the trees have different roots")
        children: dict[tuple[int, int], int] = {}
        tokens, parents, miss, depth, ranks = [root], [-1], [0.0], [0], [-1]
        for tree in trees:
            where = [0] * len(tree)
            tree_ranks = tree.head_ranks
            for i in range(1, len(tree)):
                key = (where[tree.parents[i]], tree.tokens[i])
                if key not in children:
                    children[key] = len(tokens)
                    tokens.append(tree.tokens[i])
                    parents.append(key[0])
                    miss.append(1.0)
                    depth.append(depth[key[0]] + 1)
                    ranks.append(-1)
                where[i] = node = children[key]
                miss[node] *= 1.0 - min(max(float(tree.scores[i]), 0.0), 1.0)
                if tree_ranks[i] >= 0:
                    ranks[node] = tree_ranks[i]
        has_ranks = any(t.ranks is not None for t in trees)
        return cls._best(tokens, parents, [1.0 - m for m in miss], depth, budget, ranks if has_ranks else None)

    def subtree(self, nodes: Sequence[int]) -> "TokenTree":
        """The tree of `nodes` (ancestor-closed, root included), renumbered in their old order."""
        keep = sorted(set(nodes))
        if not keep or keep[0] != 0:
            raise ValueError("a subtree keeps the root")
        new_index = {old: k for k, old in enumerate(keep)}
        try:
            parents = tuple(-1 if old == 0 else new_index[self.parents[old]] for old in keep)
        except KeyError:
            raise ValueError("subtree nodes must be ancestor-closed") from None
        return TokenTree(
            tuple(self.tokens[i] for i in keep), parents, tuple(self.scores[i] for i in keep),
            None if self.ranks is None else tuple(self.ranks[i] for i in keep),
        )

    def __len__(self) -> int:
        return len(self.tokens)

    @property
    def head_ranks(self) -> tuple[int, ...]:
        return self.ranks if self.ranks is not None else (-1,) * len(self)

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

    def best_path(self, max_depth: int | None = None) -> list[int]:
        """Node indices from the root down its best-scored child at every level (ties: the
        first), at most `max_depth` below the root: the one chain of an engine that verifies chains."""
        best: dict[int, int] = {}
        for i in range(1, len(self)):
            p = self.parents[i]
            if p not in best or self.scores[i] > self.scores[best[p]]:
                best[p] = i
        out = [0]
        while out[-1] in best and (max_depth is None or len(out) <= max_depth):
            out.append(best[out[-1]])
        return out

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

    def longest_paths(self, match: torch.Tensor) -> list[list[int]]:
        """Per row, the root-to-node path (node indices) to the deepest node whose every
        non-root node on the path has `match` [B, T] True; ties go to the lower node index."""
        parents = self.parents.clamp(min=0)
        match = match & self.valid
        acc = torch.zeros_like(match)
        acc[:, 0] = True
        for d in range(1, int(self.depths.max()) + 1):
            acc |= (self.depths == d) & match & acc.gather(1, parents)
        deepest = torch.where(acc, self.depths, -1).argmax(1).tolist()
        parents_l = self.parents.tolist()
        paths = []
        for b, node in enumerate(deepest):
            path = []
            while node != -1:
                path.append(node)
                node = parents_l[b][node]
            paths.append(path[::-1])
        return paths
