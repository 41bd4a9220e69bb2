"""An EAGLE-style feature drafter: one decoder layer over the target's own features, drafting
every branch of the tree autoregressively, expanded best-first by path value (EAGLE-2).

The draft model (EAGLE-3's shape). At sequence position t it reads g_t = FC([l_t; m_t; h_t]),
the target's hidden states entering a low, a middle and a high decoder layer (the taps), and
the input embedding of token t+1; one decoder layer of the target's own type (a copy of its
last layer whose q/k/v read [norm(e); norm(g)], 2H wide, with a residual on g) gives a_t, and
its own LM head over a reduced draft vocabulary predicts token t+2 from norm(a_t). Deeper draft
steps feed a_t back in place of the features: a node at depth d+1 reads (its parent's output,
its own token) at position t+d, attending to the true-feature prefix and its own ancestors.
The draft layer keeps its own small KV: one entry per verified position (true features, written
after every verification step) plus one per drafted tree node (dropped after the step).

Tree expansion (EAGLE-2). The last verified entry's output gives the root's children; at every
depth the `frontier` best nodes of the newest depth by value (the product of draft softmax
probabilities along the path) run one batched draft forward (all rows together) and each adds
its `topk` children; then all candidates are reranked by value and the best `budget - 1` kept.
Values never grow along a path, ties go to the shallower node, so the kept set is an
ancestor-closed tree; its scores are the values, which the planner calibrates and sizes.
Verification decides what is accepted, so the drafter only changes speed, never the output.

On disk a drafter directory holds `drafter.safetensors` (the weights and the draft vocabulary)
and `config.json` (sizes, taps, the target's identity and tokenizer). Loading it next to another
model, tokenizer or vocabulary fails naming both.
"""
from __future__ import annotations

import copy
import json
import logging
import sys
import time
from pathlib import Path
from typing import Sequence

import torch
from torch import nn
from torch.nn import functional as F

from propd_compile.drafters import Drafter
from propd_compile.heads import _describe, _text_config, identity_mismatch, model_identity, shipped_dir_for
from propd_compile.tree import TokenTree

log = logging.getLogger(__name__)

FORMAT = "propd-feature-drafter"
VERSION = 1
WEIGHTS = "drafter.safetensors"
CONFIG = "config.json"
ACCURACY = "accuracy.json"
DRAFT_VOCAB = "draft_vocab"
SHIPPED_DIR = Path(__file__).parent / "data" / "drafter"


def _decoder_layers(model: nn.Module) -> nn.ModuleList:
    layers = getattr(model.base_model, "layers", None)
    attn = getattr(layers[-1], "self_attn", None) if layers else None
    if attn is None or not all(hasattr(attn, p) for p in ("q_proj", "k_proj", "v_proj", "o_proj")):
        raise NotImplementedError(
            f"{type(model).__name__} has no Llama-style decoder layers (self_attn.q_proj/k_proj/v_proj/o_proj); "
            "the feature drafter copies one of them. Use drafters=('ngram',) or ('heads', 'ngram') for it"
        )
    return layers


def tokenizer_identity(tokenizer) -> dict:
    """Name and a digest of the vocabulary, so a drafter trained with another tokenizer is refused."""
    import hashlib

    vocab = tokenizer.get_vocab()
    digest = hashlib.sha256(json.dumps(sorted(vocab.items()), ensure_ascii=False).encode()).hexdigest()[:16]
    return {"name": Path(str(getattr(tokenizer, "name_or_path", "") or "tokenizer").rstrip("/")).name, "vocab_hash": digest, "size": len(vocab)}


class FeatureDraftModel(nn.Module):
    """The draft network. The target's embedding and rotary tables are used, not owned."""

    def __init__(self, model: nn.Module, taps: Sequence[int], draft_vocab: torch.Tensor, init_from_target: bool = True) -> None:
        super().__init__()
        cfg = _text_config(model)
        H = cfg.hidden_size
        self.taps = tuple(int(t) for t in taps)
        self.hidden_size = H
        layer = copy.deepcopy(_decoder_layers(model)[-1]).float()
        attn = layer.self_attn
        for name in ("q_proj", "k_proj", "v_proj"):
            old = getattr(attn, name)
            new = nn.Linear(2 * H, old.out_features, bias=old.bias is not None)
            with torch.no_grad():  # start from the target's projection of the hidden half
                new.weight.zero_()
                if init_from_target:
                    new.weight[:, H:] = old.weight.float() * layer.input_layernorm.weight.float()[None]
                else:
                    nn.init.normal_(new.weight, std=0.02)
                if old.bias is not None:
                    new.bias.copy_(old.bias.float())
            setattr(attn, name, new)
        del layer.input_layernorm  # replaced by the two input norms below
        self.layer = layer
        norm = copy.deepcopy(model.base_model.norm).float()
        self.embed_norm, self.hidden_norm, self.out_norm = copy.deepcopy(norm), copy.deepcopy(norm), norm
        for n in (self.embed_norm, self.hidden_norm):
            nn.init.ones_(n.weight)
        self.fc = nn.Linear(len(self.taps) * H, H, bias=False)
        with torch.no_grad():  # start as the top tap alone
            self.fc.weight.zero_()
            self.fc.weight[:, (len(self.taps) - 1) * H :] = torch.eye(H)
        self.register_buffer("draft_vocab", draft_vocab.clone().long(), persistent=False)
        self.lm_head = nn.Linear(H, len(draft_vocab), bias=False)
        with torch.no_grad():
            self.lm_head.weight.copy_(model.get_output_embeddings().weight.detach().float()[draft_vocab])
        self.num_heads = cfg.num_attention_heads
        self.num_kv_heads = getattr(cfg, "num_key_value_heads", None) or self.num_heads
        self.head_dim = getattr(cfg, "head_dim", None) or H // self.num_heads
        self._rope = sys.modules[type(layer).__module__].apply_rotary_pos_emb
        # the target's modules, read at run time (not parameters of the drafter, not saved)
        self._target = [model.get_input_embeddings(), model.base_model.rotary_emb]
        self.requires_grad_(True)  # the copied target modules may come frozen

    # --- pieces -----------------------------------------------------------------------------
    def fuse(self, features: torch.Tensor) -> torch.Tensor:
        """[..., len(taps) * H] tapped target features -> g [..., H]."""
        return self.fc(features.to(self.fc.weight.dtype))

    def logits(self, a: torch.Tensor) -> torch.Tensor:
        """Draft-vocabulary logits [..., V'] from draft outputs a [..., H]."""
        return self.lm_head(self.out_norm(a))

    def qkv(self, hidden: torch.Tensor, tokens: torch.Tensor, positions: torch.Tensor):
        """Queries [B, nh, T, hd] and new keys/values [B, nkv, T, hd] for inputs hidden [B, T, H]
        (g or a parent's a) and tokens [B, T] at positions [B, T]."""
        embed, rotary = self._target
        e = embed(tokens).to(hidden.dtype)
        x = torch.cat([self.embed_norm(e), self.hidden_norm(hidden)], -1)
        attn = self.layer.self_attn
        B, T, _ = x.shape
        q = attn.q_proj(x).view(B, T, -1, self.head_dim)
        k = attn.k_proj(x).view(B, T, -1, self.head_dim)
        if getattr(attn, "q_norm", None) is not None:
            q, k = attn.q_norm(q), attn.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)
        v = attn.v_proj(x).view(B, T, -1, self.head_dim).transpose(1, 2)
        cos, sin = rotary(v, positions)
        q, k = self._rope(q, k, cos.to(q.dtype), sin.to(q.dtype))
        return q, k, v

    def finish(self, hidden: torch.Tensor, attended: torch.Tensor) -> torch.Tensor:
        """The layer after attention: a = hidden + o_proj(attended) + MLP(...), attended [B, nh, T, hd]."""
        B, _, T, _ = attended.shape
        h = hidden + self.layer.self_attn.o_proj(attended.transpose(1, 2).reshape(B, T, -1))
        return h + self.layer.mlp(self.layer.post_attention_layernorm(h))

    def _expand_kv(self, t: torch.Tensor) -> torch.Tensor:
        rep = self.num_heads // self.num_kv_heads
        return t if rep == 1 else t.repeat_interleave(rep, dim=1)

    def attend(self, q, keys, values, mask) -> torch.Tensor:
        """SDPA of q [B, nh, T, hd] over keys/values [B, nkv, S, hd] where mask [B, T, S] is True."""
        return F.scaled_dot_product_attention(
            q, self._expand_kv(keys), self._expand_kv(values), attn_mask=mask[:, None],
            scale=self.layer.self_attn.scaling,
        )

    # --- training: EAGLE-3's training-time test ------------------------------------------------
    def unrolled(self, features: torch.Tensor, tokens: torch.Tensor, steps: int) -> list[torch.Tensor]:
        """Draft logits of every position for steps 0..steps-1 (training-time test).

        features [B, N, F] (position t), tokens [B, N]. Step j at position t reads token t+j+1
        (padding past the end) and, for j > 0, step j-1's output at t; it attends to step 0's
        keys at positions <= t (the true-feature prefix) and to steps 1..j at t (its own path),
        at position t+j; its logits predict the target's distribution at t+j+1. Returns
        logits [B, N, V'] per step.
        """
        B, N, _ = features.shape
        device = features.device
        pos = torch.arange(N, device=device).expand(B, N)
        hidden = self.fuse(features)
        causal = torch.ones(N, N, dtype=torch.bool, device=device).tril()
        out, keys, values = [], [], []
        for j in range(steps):
            toks = F.pad(tokens[:, j + 1 :], (0, j + 1), value=0)
            q, k, v = self.qkv(hidden, toks, pos + j)
            if j == 0:
                attended = self.attend(q, k, v, causal.expand(B, N, N))
            else:
                kk, vv = self._expand_kv(k), self._expand_kv(v)
                k0, v0 = self._expand_kv(keys[0]), self._expand_kv(values[0])
                s0 = (q @ k0.transpose(-1, -2)) * self.layer.self_attn.scaling
                s0 = s0.masked_fill(~causal, float("-inf"))
                diag = [(q * self._expand_kv(keys[i])).sum(-1, keepdim=True) for i in range(1, j)]
                diag.append((q * kk).sum(-1, keepdim=True))
                sd = torch.cat(diag, -1) * self.layer.self_attn.scaling  # [B, nh, N, j]
                p = torch.softmax(torch.cat([s0, sd], -1), -1)
                vs = [self._expand_kv(values[i]) for i in range(1, j)] + [vv]
                attended = p[..., :N] @ v0
                for i, vi in enumerate(vs):
                    attended = attended + p[..., N + i : N + i + 1] * vi
            keys.append(k)
            values.append(v)
            hidden = self.finish(hidden, attended)
            out.append(self.logits(hidden))
        return out


# --- persistence -----------------------------------------------------------------------------------
def save_drafter(draft: FeatureDraftModel, directory: str | Path, config: dict, dtype=torch.float16, accuracy: dict | None = None) -> Path:
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu", dtype).contiguous() for k, v in draft.state_dict().items()}
    tensors[DRAFT_VOCAB] = draft.draft_vocab.detach().cpu().long().contiguous()
    save_file(tensors, str(directory / WEIGHTS), metadata={"format": FORMAT})
    cfg = {"format": FORMAT, "version": VERSION, "taps": list(draft.taps), "draft_vocab_size": int(len(draft.draft_vocab)), **config}
    (directory / CONFIG).write_text(json.dumps(cfg, indent=1) + "\n")
    if accuracy is not None:
        (directory / ACCURACY).write_text(json.dumps(accuracy, indent=1) + "\n")
    return directory


def drafter_config(model: nn.Module, tokenizer=None) -> dict:
    """The identity recorded with a drafter: the target model (and its tokenizer)."""
    return {"base_model": model_identity(model), "tokenizer": tokenizer_identity(tokenizer) if tokenizer is not None else None}


def load_drafter(directory: str | Path, model: nn.Module, tokenizer=None) -> tuple[FeatureDraftModel, dict]:
    """(draft model, config) from `directory`, checked against `model` (and `tokenizer`)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    directory = Path(directory)
    fix = "train one with `propd train-drafter --model NAME --out DIR` and pass ProPDConfig(drafter=DIR)"
    cfg_path, w_path = directory / CONFIG, directory / WEIGHTS
    if not cfg_path.exists() or not w_path.exists():
        raise FileNotFoundError(f"no feature drafter in {directory} (expected {CONFIG} and {WEIGHTS}); {fix}")
    try:
        cfg = json.loads(cfg_path.read_text())
        state = load_file(str(w_path))
    except (ValueError, OSError, SafetensorError) as e:
        raise ValueError(f"the feature drafter in {directory} is unreadable ({e}); delete it and {fix}") from e
    if cfg.get("format") != FORMAT:
        raise ValueError(f"{cfg_path} is not a propd feature-drafter config (format {cfg.get('format')!r}); {fix}")
    if cfg.get("version", 0) > VERSION:
        raise ValueError(f"{cfg_path} has drafter format version {cfg['version']}; this propd reads up to {VERSION}")
    why = identity_mismatch(cfg["base_model"], model)
    if why:
        raise ValueError(f"the feature drafter in {directory} does not fit this model: {why}; {fix}")
    if tokenizer is not None and cfg.get("tokenizer"):
        mine = tokenizer_identity(tokenizer)
        if mine["vocab_hash"] != cfg["tokenizer"]["vocab_hash"]:
            raise ValueError(
                f"the feature drafter in {directory} was trained with tokenizer {cfg['tokenizer']['name']!r} "
                f"(vocabulary {cfg['tokenizer']['size']}, hash {cfg['tokenizer']['vocab_hash']}), but the tokenizer is "
                f"{mine['name']!r} (vocabulary {mine['size']}, hash {mine['vocab_hash']}); {fix}"
            )
    vocab = state.pop(DRAFT_VOCAB, None)
    V = _text_config(model).vocab_size
    if vocab is None or vocab.numel() != cfg.get("draft_vocab_size") or int(vocab.max()) >= V or int(vocab.min()) < 0:
        raise ValueError(
            f"the feature drafter in {directory} has a draft vocabulary that does not fit {_describe(model_identity(model))} "
            f"(vocabulary {V}); {fix}"
        )
    draft = FeatureDraftModel(model, cfg["taps"], vocab, init_from_target=False)
    try:
        draft.load_state_dict({k: v.float() for k, v in state.items()})
    except RuntimeError as e:
        raise ValueError(f"the feature drafter in {directory} does not match its config ({e}); {fix}") from e
    return draft.eval(), cfg


def shipped_drafter_for(model: nn.Module, root: Path = SHIPPED_DIR) -> Path | None:
    """The packaged drafter directory trained for `model`, if any."""
    return shipped_dir_for(model, root, FORMAT)


def resolve_drafter(model: nn.Module, path: str | Path | None) -> FeatureDraftModel | None:
    """The drafter at `path` (checked against `model`), else the one shipped for it, else None;
    kept per path in an accelerated model's state."""
    from propd_compile.heads import check_hidden_logits
    from propd_compile.state import built_for

    if path is None:
        path = built_for(model, ("shipped drafter",), lambda: shipped_drafter_for(model))
        if path is None:
            return None

    def load() -> FeatureDraftModel:
        check_hidden_logits(model)
        param = next(model.parameters())
        return load_drafter(path, model)[0].to(param.device)

    return built_for(model, ("feature drafter", str(Path(path).resolve())), load)


# --- the drafter -----------------------------------------------------------------------------------
class _RowKV:
    """One batch's draft KV: verified entries per row in [0, length), grown on demand."""

    def __init__(self, batch: int, kv_heads: int, head_dim: int, device, dtype, capacity: int = 256) -> None:
        self.k = torch.zeros(batch, kv_heads, capacity, head_dim, device=device, dtype=dtype)
        self.v = torch.zeros_like(self.k)
        self.length = torch.zeros(batch, dtype=torch.long, device=device)

    def reserve(self, n: int) -> None:
        if n > self.k.shape[2]:
            cap = max(n, 2 * self.k.shape[2])
            pad = (0, 0, 0, cap - self.k.shape[2])
            self.k, self.v = F.pad(self.k, pad), F.pad(self.v, pad)


class FeatureDrafter(Drafter):
    """Drafts with a `FeatureDraftModel` from the verification forward's tapped features.

    After every verification the decode loop hands each unfinished row the features of its
    accepted path (`set_features`); they pair with the tokens that followed them and extend the
    draft KV. The first `propose` of a step then drafts every pending row at once, batched per
    depth. `seconds_per_depth` keeps a running mean of the drafting time per tree depth (index 0:
    writing the verified entries, which also gives depth 1) for a cost-aware planner; `steps`
    and `seconds` total what this drafter spent.
    """

    def __init__(self, draft: FeatureDraftModel, max_depth: int = 6, topk: int = 8, frontier: int = 8, min_value: float = 0.01) -> None:
        self.draft, self.topk, self.frontier, self.min_value = draft, topk, frontier, min_value
        self.depth = max_depth
        self.feature_layers = draft.taps
        self.seconds_per_depth: list[float] = []
        self.seconds, self.steps = 0.0, 0
        self.kv: _RowKV | None = None
        self.tokens: list[list[int]] = []

    # --- the Drafter interface -----------------------------------------------------------------
    def start(self, sequences: Sequence[Sequence[int]]) -> None:
        p = next(self.draft.parameters())
        self.tokens = [list(map(int, s)) for s in sequences]
        self.kv = _RowKV(len(sequences), self.draft.num_kv_heads, self.draft.head_dim, p.device, p.dtype)
        self.root_out: list[torch.Tensor | None] = [None] * len(sequences)  # a of each row's last verified entry
        self.trees: list[TokenTree | None] = [None] * len(sequences)
        self.pending: set[int] = set()

    def advance(self, row: int, tokens: Sequence[int]) -> None:
        self.tokens[row].extend(int(t) for t in tokens)
        if tokens:
            self.trees[row] = None
            self.root_out[row] = None  # until the features of the new root's parent arrive

    def set_features(self, rows: Sequence[int], features: Sequence[torch.Tensor]) -> None:
        """features[i] [n, F]: the tapped features of the next n verified positions of rows[i]
        (each pairs with the token after it, which `advance` already appended)."""
        rows = [r for r, f in zip(rows, features) if len(f)]
        features = [f for f in features if len(f)]
        if not rows:
            return
        t0 = time.perf_counter()
        with torch.no_grad():
            self._commit(rows, features)
        dt = time.perf_counter() - t0
        self.seconds += dt
        self._record(0, dt)
        self.pending.update(rows)

    def propose(self, row: int, budget: int) -> TokenTree:
        root = self.tokens[row][-1]
        if budget <= 1 or self.depth == 0:
            return TokenTree.root_only(root)
        if row in self.pending:
            t0 = time.perf_counter()
            with torch.no_grad():
                self._expand(sorted(self.pending), budget)
            self.seconds += time.perf_counter() - t0
            self.steps += 1
            self.pending.clear()
        tree = self.trees[row]
        if tree is None:
            return TokenTree.root_only(root)
        if len(tree) <= budget:
            return tree
        depths = tree.depths
        best = sorted(range(1, len(tree)), key=lambda i: (-tree.scores[i], depths[i], i))[: budget - 1]
        return tree.subtree([0, *best])

    # --- drafting -------------------------------------------------------------------------------
    def _record(self, depth: int, seconds: float) -> None:
        while len(self.seconds_per_depth) <= depth:
            self.seconds_per_depth.append(seconds)
        self.seconds_per_depth[depth] = 0.9 * self.seconds_per_depth[depth] + 0.1 * seconds

    def _commit(self, rows: list[int], features: list[torch.Tensor]) -> None:
        """Write the verified entries (feature of position t, token t+1) of `rows` into the draft KV."""
        d, kv = self.draft, self.kv
        device = kv.k.device
        n = torch.tensor([len(f) for f in features], device=device)
        R, M = len(rows), int(n.max())
        ridx = torch.tensor(rows, device=device)
        start = kv.length[ridx]  # position of each row's first new entry
        kv.reserve(int((start + n).max()))
        feats = torch.zeros(R, M, features[0].shape[-1], device=device, dtype=kv.k.dtype)
        toks = torch.zeros(R, M, dtype=torch.long, device=device)
        for i, (r, f) in enumerate(zip(rows, features)):
            s = int(start[i])
            feats[i, : len(f)] = f.to(device, kv.k.dtype)
            toks[i, : len(f)] = torch.tensor(self.tokens[r][s + 1 : s + 1 + len(f)], device=device)
        offs = torch.arange(M, device=device)
        pos = start[:, None] + offs[None]
        g = d.fuse(feats)
        q, k, v = d.qkv(g, toks, pos)
        real = offs[None] < n[:, None]  # [R, M]
        # write the new entries at [start, start + n) of their rows (padding lands past the end)
        b_idx = ridx[:, None].expand(R, M)[real]
        p_idx = pos[real]
        kv.k[b_idx, :, p_idx] = k.transpose(1, 2)[real]
        kv.v[b_idx, :, p_idx] = v.transpose(1, 2)[real]
        S = int((start + n).max())
        key_pos = torch.arange(S, device=device)
        mask = key_pos[None, None] <= pos[:, :, None]  # causal over the row's entries
        mask &= real[:, :, None] | (key_pos[None, None] == 0)
        a = d.finish(g, d.attend(q, kv.k[ridx, :, :S], kv.v[ridx, :, :S], mask))
        kv.length[ridx] = start + n
        last = a[torch.arange(R, device=device), n - 1]
        for i, r in enumerate(rows):
            self.root_out[r] = last[i]

    def _expand(self, rows: list[int], budget: int) -> None:
        """EAGLE-2 expansion of every row in `rows` at once; sets self.trees[row]."""
        d, kv = self.draft, self.kv
        device = kv.k.device
        rows = [r for r in rows if self.root_out[r] is not None]
        if not rows:
            return
        R, K = len(rows), min(self.topk, len(d.draft_vocab))
        ridx = torch.tensor(rows, device=device)
        vocab = d.draft_vocab.to(device)
        a_root = torch.stack([self.root_out[r] for r in rows])
        # Candidates level by level (level L holds depth L + 1): token, value, global parent index.
        probs, ids = d.logits(a_root).float().softmax(-1).topk(K, dim=-1)  # [R, K]
        tokens, values = [vocab[ids]], [probs]
        parents = [torch.full((R, K), -1, dtype=torch.long, device=device)]
        reads = a_root[:, None].expand(R, K, -1)  # the draft output each newest candidate's forward reads
        level_start = 0  # global index of the newest level's first candidate
        prefix = kv.length[ridx]
        S = int(prefix.max())
        keys, vals_kv = kv.k[ridx, :, :S], kv.v[ridx, :, :S]
        mask_prefix = torch.arange(S, device=device)[None, None] < prefix[:, None, None]  # [R, 1, S]
        ancestors = None  # [R, f, slots]: each frontier node's ancestors among the drafted slots, itself included
        for depth in range(1, self.depth):
            t0 = time.perf_counter()
            f = min(self.frontier, values[-1].shape[1])
            front_val, front = values[-1].topk(f, dim=-1)  # the newest level's best nodes
            if float(front_val.max()) < self.min_value:
                break
            tok = tokens[-1].gather(1, front)
            hid = reads.gather(1, front[..., None].expand(-1, -1, reads.shape[-1]))
            q, k, v = d.qkv(hid, tok, (prefix - 1 + depth)[:, None].expand(R, f))
            own = torch.eye(f, dtype=torch.bool, device=device).expand(R, f, f)
            if ancestors is None:
                ancestors = own
            else:  # a frontier node's parent is frontier node (candidate // K) of the previous forward
                up = ancestors.gather(1, (front // K)[..., None].expand(-1, -1, ancestors.shape[-1]))
                ancestors = torch.cat([up, torch.zeros(R, f, f, dtype=torch.bool, device=device)], -1) | torch.cat(
                    [torch.zeros_like(up), own], -1
                )
            keys, vals_kv = torch.cat([keys, k], 2), torch.cat([vals_kv, v], 2)
            slots = keys.shape[2] - S
            mask = torch.cat([mask_prefix.expand(R, f, S), ancestors[..., :slots]], -1)
            a = d.finish(hid, d.attend(q, keys, vals_kv, mask))  # [R, f, H]
            p, i = d.logits(a).float().softmax(-1).topk(K, dim=-1)  # [R, f, K]
            tokens.append(vocab[i].flatten(1))
            values.append((front_val[..., None] * p).flatten(1))
            parents.append((level_start + front).repeat_interleave(K, dim=1))
            level_start += values[-2].shape[1]
            reads = a.repeat_interleave(K, dim=1)
            self._record(depth, time.perf_counter() - t0)
        toks = torch.cat(tokens, 1).cpu().tolist()
        vals = torch.cat(values, 1).cpu().tolist()
        pars = torch.cat(parents, 1).cpu().tolist()
        for b, row in enumerate(rows):
            self.trees[row] = _best_tree(self.tokens[row][-1], toks[b], pars[b], vals[b], budget)


def _best_tree(root: int, tokens: list[int], parents: list[int], values: list[float], budget: int) -> TokenTree:
    """The `budget - 1` best candidates by value (ties: shallower, then earlier) as a TokenTree.

    A candidate's value is at most its parent's, and a parent precedes its children, so the
    kept set is ancestor-closed. Two siblings drafting the same token cannot happen (top-k of one
    softmax), so tokens stay distinct among siblings.
    """
    depth = []
    for p in parents:
        depth.append(1 if p < 0 else depth[p] + 1)
    order = sorted(range(len(tokens)), key=lambda i: (-values[i], depth[i], i))[: max(budget - 1, 0)]
    keep = sorted(order, key=lambda i: (depth[i], i))
    where = {}
    out_t, out_p, out_s = [root], [-1], [1.0]
    for i in keep:
        p = parents[i]
        where[i] = len(out_t)
        out_t.append(tokens[i])
        out_p.append(0 if p < 0 else where[p])
        out_s.append(min(max(values[i], 0.0), 1.0))
    return TokenTree(tuple(out_t), tuple(out_p), tuple(out_s))
