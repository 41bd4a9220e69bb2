"""Sampling on the token tree: exact multi-draft speculative sampling, and Medusa's lossy
typical acceptance.

Drafters propose tokens, not distributions, so every draft is a point mass. Against a point mass
at x, speculative sampling accepts x with probability min(1, p(x) / 1) = p(x), and on rejection
samples from normalize(max(p - onehot(x), 0)) = p with x removed. A node tries its children
x_1..x_k in tree order, each against the residual the rejected ones left, and when all are
rejected samples the bonus token from the final residual. With a_i = p(x_i) / (1 - S_{i-1}),
S_i = p(x_1) + ... + p(x_i), the product of (1 - a_j) over j < i telescopes to 1 - S_{i-1}, so

    P(out = x_i) = (1 - S_{i-1}) a_i = p(x_i),
    P(out = y), y no child = (1 - S_k) p(y) / (1 - S_k) = p(y).

So the token that leaves a node is drawn exactly from p. If it is a child, the walk descends and
repeats the argument with the child's distribution, which the verification forward computed
given exactly the tokens before it; the tree is fixed before the uniforms are drawn. Hence every
emitted token, accepted or bonus, follows the model's sampling distribution given its history,
exactly as plain sampling, whatever the drafter proposes.
"""
from __future__ import annotations

import torch

from propd_compile.decoding import AcceptRule
from propd_compile.tree import TreeBatch


def sibling_acceptance(p: torch.Tensor, cand: torch.Tensor, valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Point-mass multi-draft rejection at one node.

    p [..., V]: probabilities; cand [..., K]: distinct candidate tokens, tried in order; valid
    [..., K] marks real candidates. Returns a [..., K], the probability of accepting candidate k
    once candidates < k were rejected, and the residual [..., V], p with every candidate removed
    (unnormalised): what the bonus token is drawn from when all are rejected.

    The denominator of a_k sums exactly the mass left (candidate k, later candidates, residual)
    instead of computing 1 - S_{k-1}: a candidate holding all remaining mass is then accepted with
    probability exactly 1, so a rejection never leaves an all-zero residual to sample from.
    """
    cand = torch.where(valid, cand, 0)
    pc = p.gather(-1, cand) * valid
    removed = torch.zeros_like(p).scatter_add_(-1, cand, valid.to(p.dtype)) > 0
    residual = p.masked_fill(removed, 0.0)
    from_k = pc.flip(-1).cumsum(-1).flip(-1)
    later = torch.cat([from_k[..., 1:], torch.zeros_like(from_k[..., :1])], -1)
    mass = pc + (later + residual.sum(-1, keepdim=True))
    return pc / mass.clamp(min=torch.finfo(p.dtype).tiny), residual


def children(batch: TreeBatch) -> torch.Tensor:
    """[B, T, K] long: the node index of each node's k-th child in tree order, -1 past the last."""
    B, T = batch.tokens.shape
    parents = batch.parents
    is_child = batch.valid & (parents >= 0)
    earlier = torch.ones(T, T, dtype=torch.bool).tril(-1)
    rank = ((parents[:, :, None] == parents[:, None, :]) & is_child[:, None, :] & earlier).sum(-1)
    K = int(rank[is_child].max()) + 1 if is_child.any() else 1
    table = torch.full((B, T, K), -1, dtype=torch.long)
    b, c = is_child.nonzero(as_tuple=True)
    table[b, parents[b, c], rank[b, c]] = c
    return table


def speculative_tree_sample(
    batch: TreeBatch, probs: torch.Tensor, generator: torch.Generator | None = None
) -> tuple[list[list[int]], list[int]]:
    """Per row, the accepted root-to-node path and the bonus token after it, drawn so that every
    emitted token follows probs [B, T, V] (the sampling distribution after each node) exactly."""
    device = probs.device
    kids = children(batch).to(device)
    cand = batch.tokens.to(device).gather(1, kids.clamp(min=0).flatten(1)).view(kids.shape)
    accept_p, residual = sibling_acceptance(probs, cand, kids >= 0)
    hit = torch.rand(accept_p.shape, generator=generator, device=device, dtype=probs.dtype) < accept_p
    first = hit.to(torch.uint8).argmax(-1, keepdim=True)  # the first accepted child, in tree order
    chosen = torch.where(hit.any(-1), kids.gather(-1, first).squeeze(-1), -1).tolist()
    paths = []
    for row in chosen:
        path = [0]
        while row[path[-1]] >= 0:
            path.append(row[path[-1]])
        paths.append(path)
    # The walk stops where every child was rejected (or at a leaf): draw from that node's residual.
    last = torch.tensor([path[-1] for path in paths], device=device)
    bonus = torch.multinomial(residual[torch.arange(len(paths), device=device), last], 1, generator=generator)
    return paths, bonus.squeeze(1).tolist()


def typical_threshold(p: torch.Tensor, posterior_threshold: float, posterior_alpha: float) -> torch.Tensor:
    """Medusa's typical-acceptance bar min(threshold, alpha * exp(-entropy(p))) for p [..., V]:
    confident distributions (low entropy) demand more of a candidate than flat ones."""
    entropy = -torch.special.xlogy(p, p).sum(-1)
    return torch.clamp(posterior_alpha * torch.exp(-entropy), max=posterior_threshold)


def typical_tree_accept(
    batch: TreeBatch,
    probs: torch.Tensor,
    posterior_threshold: float,
    posterior_alpha: float,
    generator: torch.Generator | None = None,
) -> tuple[list[list[int]], list[int]]:
    """Medusa's typical acceptance (lossy): a node is accepted if its parent is and
    p_parent(token) > typical_threshold(p_parent); each row takes the longest accepted path (the
    first in tree order among equals) and draws the bonus token from p after its last node."""
    device = probs.device
    B = probs.shape[0]
    rows = torch.arange(B, device=device)[:, None]
    parents = batch.parents.clamp(min=0).to(device)
    p_token = probs[rows, parents, batch.tokens.to(device)]
    bar = typical_threshold(probs, posterior_threshold, posterior_alpha).gather(1, parents)
    paths = batch.longest_paths((p_token > bar).cpu())
    last = torch.tensor([path[-1] for path in paths], device=device)
    bonus = torch.multinomial(probs[rows[:, 0], last], 1, generator=generator)
    return paths, bonus.squeeze(1).tolist()


def sampling_rule(
    generator: torch.Generator | None = None,
    acceptance: str = "exact",
    posterior_threshold: float = 0.09,
    posterior_alpha: float = 0.3,
) -> AcceptRule:
    """The acceptance rule for `tree_generate` when sampling: exact (lossless) or typical (lossy),
    on scores already processed per node (`tree_generate(process=...)`: HF's processors and
    warpers), from which it samples softmax(scores) as HF's sampling loop does. Draws run on the
    generator's device (the global RNG of the scores' device without one), so
    `torch.manual_seed` makes a decode reproducible."""

    def rule(batch: TreeBatch, scores: torch.Tensor) -> tuple[list[list[int]], list[int]]:
        probs = torch.softmax(scores, -1)
        if generator is not None:
            probs = probs.to(generator.device)
        if acceptance == "typical":
            return typical_tree_accept(batch, probs, posterior_threshold, posterior_alpha, generator)
        return speculative_tree_sample(batch, probs, generator)

    return rule
