"""Medusa draft heads: K small residual blocks on the base model's last hidden state.

Head k (0-based) reads the hidden state h_t that feeds the LM head at position t (after the
final norm; the LM head on h_t predicts token t+1) and predicts token t+k+2, i.e. k+1 steps past
the next token:  logits_k = LMHead(h_t + SiLU(W_k h_t + b_k))  (Medusa's block). W_k and b_k
start at zero, so a fresh head repeats the base model's next-token prediction. The LM head is
the base model's own, frozen and not saved (an own projection per head is an option).

With `root_token=True` (the default of `propd train-heads`) each head also reads the input
embedding e of token t+1, the tree's root, which verification has already fixed when the heads
run:  logits_k = LMHead(h_t + V_k SiLU(W_k [h_t; e] + b_k) + c_k)  (V_k, c_k zero at init).
Knowing the next token is most of what a head at a small model lacks: on SmolLM2 held-out
answers head 0's top-1 goes from 0.28 to 0.42 with the same data (BENCHMARKS.md, "Draft heads: accuracy").

On disk a heads directory holds `heads.safetensors` (the residual blocks, fp16 by default),
`config.json` (sizes, K, and the base model's identity: name, a hash of its architecture
fields and a small probe of its LM-head weights) and, from the trainer, `accuracy.json`
(held-out per-head top-1/top-5 and per-(head, rank) accuracies, which the static Medusa tree
uses). Loading heads next to a model they were not trained for fails and names both.
"""
from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn
from torch.nn import functional as F

log = logging.getLogger(__name__)

FORMAT = "propd-medusa-heads"
VERSION = 1
WEIGHTS = "heads.safetensors"
CONFIG = "config.json"
ACCURACY = "accuracy.json"
DRAFT_VOCAB = "draft_vocab"  # the tensor of draftable token ids in heads.safetensors
SHIPPED_DIR = Path(__file__).parent / "data" / "heads"

ARCH_FIELDS = (
    "model_type", "hidden_size", "vocab_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "intermediate_size", "head_dim", "tie_word_embeddings",
)


# --- base model identity ----------------------------------------------------------------------
def _text_config(model: nn.Module):
    cfg = model.config
    return cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg


def _jsonable(v: Any) -> Any:
    return v if isinstance(v, (int, float, str, bool, type(None))) else repr(v)


def _probe(model: nn.Module) -> list[float]:
    """A fingerprint of the weights: 16 evenly spaced LM-head rows, first 8 columns."""
    w = model.get_output_embeddings().weight.detach()
    rows = torch.linspace(0, w.shape[0] - 1, 16).round().long().to(w.device)
    return [round(float(x), 5) for x in w[rows, : min(8, w.shape[1])].float().flatten().cpu()]


def model_name(model: nn.Module) -> str:
    path = str(getattr(model, "name_or_path", "") or getattr(model.config, "_name_or_path", "") or "")
    return Path(path.rstrip("/")).name if path else f"unnamed {_text_config(model).model_type} model"


def model_identity(model: nn.Module) -> dict:
    cfg = _text_config(model)
    arch = {f: _jsonable(getattr(cfg, f, None)) for f in ARCH_FIELDS}
    digest = hashlib.sha256(json.dumps(arch, sort_keys=True).encode()).hexdigest()[:16]
    return {"name": model_name(model), "config_hash": digest, "architecture": arch, "probe": _probe(model)}


def _describe(identity: dict) -> str:
    a = identity["architecture"]
    return (
        f"{identity['name']!r} ({a.get('model_type')}, hidden {a.get('hidden_size')}, vocab {a.get('vocab_size')}, "
        f"{a.get('num_hidden_layers')} layers, config hash {identity['config_hash']})"
    )


def identity_mismatch(built_for: dict, model: nn.Module) -> str | None:
    """Why heads built for `built_for` do not fit `model`, or None when they do."""
    mine = model_identity(model)
    if built_for["config_hash"] != mine["config_hash"]:
        return f"they were made for {_describe(built_for)}, but the model is {_describe(mine)}"
    a, b = torch.tensor(built_for["probe"]), torch.tensor(mine["probe"])
    if a.shape != b.shape or not torch.allclose(a, b, rtol=2e-2, atol=2e-2):
        return (
            f"they were made for {_describe(built_for)}; the model {mine['name']!r} has the same architecture "
            "but different weights"
        )
    return None


# --- the heads --------------------------------------------------------------------------------
class ResBlock(nn.Module):
    """h + SiLU(W h + b), W and b zero at init (the identity)."""

    def __init__(self, hidden_size: int) -> None:
        super().__init__()
        self.linear = nn.Linear(hidden_size, hidden_size)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + F.silu(self.linear(h))


class RootBlock(nn.Module):
    """h + V SiLU(W [h; e] + b) + c: a residual MLP on the hidden state and the root token's
    embedding e; V and c zero at init (the identity)."""

    def __init__(self, hidden_size: int, embed_size: int) -> None:
        super().__init__()
        self.inner = nn.Linear(hidden_size + embed_size, hidden_size)
        self.linear = nn.Linear(hidden_size, hidden_size)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, h: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        return h + self.linear(F.silu(self.inner(torch.cat([h, e.to(h.dtype)], -1))))


class _PackedBlocks(nn.Module):
    """The heads' residual blocks over the Q8_0 weights nearest to theirs, through the
    block-format kernel (drafting only: see `MedusaHeads.draft_logits`). Every head's first
    linear reads the same input (h, or [h; e] with the root token's embedding), so those are
    stacked into one product: one kernel call for all heads instead of one per head, which is
    most of what a head costs at one row."""

    def __init__(self, blocks: nn.ModuleList) -> None:
        from propd_compile.kernels.block_linear import nearest_q8_0

        super().__init__()
        self.root_token = isinstance(blocks[0], RootBlock)
        first = [b.inner if self.root_token else b.linear for b in blocks]
        self.first = nearest_q8_0(torch.cat([f.weight.detach().float() for f in first]))
        self.first_bias = torch.cat([f.bias.detach().float() for f in first])
        # the root-token blocks' second linear, per head
        self.second = [(nearest_q8_0(b.linear.weight.detach().float()), b.linear.bias.detach().float())
                       for b in blocks] if self.root_token else []
        self.num_heads = len(blocks)

    def forward(self, hidden: torch.Tensor, num_heads: int, root: torch.Tensor | None = None) -> torch.Tensor:
        """[..., H] -> [..., num_heads, H], as `MedusaHeads.features`."""
        from propd_compile.kernels.block_linear import block_linear

        x = torch.cat([hidden, root.to(hidden.dtype)], -1) if self.root_token else hidden
        a = F.silu(block_linear(x, self.first) + self.first_bias).unflatten(-1, (self.num_heads, -1))[..., :num_heads, :]
        if not self.root_token:  # h + SiLU(W h + b)
            return hidden[..., None, :] + a
        second = self.second[:num_heads]
        return torch.stack([hidden + block_linear(a[..., k, :], w) + b for k, (w, b) in enumerate(second)], -2)


class MedusaHeads(nn.Module):
    def __init__(
        self, hidden_size: int, vocab_size: int, num_heads: int = 4, own_projection: bool = False,
        base: dict | None = None, root_token: bool = False, embed_size: int | None = None,
    ) -> None:
        super().__init__()
        if num_heads < 1:
            raise ValueError("MedusaHeads needs at least one head")
        self.hidden_size, self.vocab_size, self.num_heads = hidden_size, vocab_size, num_heads
        self.own_projection, self.root_token = own_projection, root_token
        self.embed_size = (embed_size or hidden_size) if root_token else None
        self.base = base or {}
        self.blocks = nn.ModuleList(
            RootBlock(hidden_size, self.embed_size) if root_token else ResBlock(hidden_size) for _ in range(num_heads)
        )
        self.projections = (
            nn.ModuleList(nn.Linear(hidden_size, vocab_size, bias=False) for _ in range(num_heads))
            if own_projection else None
        )
        self.accuracy: dict | None = None  # accuracy.json, when loaded from a trained directory
        # Token ids the heads may draft (the trainer's target tokens), or None for the whole
        # vocabulary: the LM-head product then costs |draft_vocab| / V of the full one per head.
        self.draft_vocab: torch.Tensor | None = None
        self._draft_weight: tuple | None = None

    @classmethod
    def for_model(
        cls, model: nn.Module, num_heads: int = 4, own_projection: bool = False, root_token: bool = False
    ) -> "MedusaHeads":
        cfg = _text_config(model)
        lm_head = model.get_output_embeddings()
        embed = model.get_input_embeddings().weight.shape[1]
        heads = cls(cfg.hidden_size, lm_head.weight.shape[0], num_heads, own_projection, model_identity(model), root_token, embed)
        if own_projection:  # start from the base LM head, so a fresh head still equals it
            for p in heads.projections:
                p.weight.data.copy_(lm_head.weight.detach().float())
        return heads

    def features(self, hidden: torch.Tensor, num_heads: int | None = None, root: torch.Tensor | None = None) -> torch.Tensor:
        """[..., H] -> [..., K, H]: each head's residual block applied to the hidden state; `root`
        [..., E] is the root token's input embedding (needed iff the heads are `root_token`)."""
        self._check_root(root)
        blocks = self.blocks[: num_heads or self.num_heads]
        if self.root_token:
            return torch.stack([blk(hidden, root) for blk in blocks], dim=-2)
        return torch.stack([blk(hidden) for blk in blocks], dim=-2)

    def _check_root(self, root: torch.Tensor | None) -> None:
        if self.root_token and root is None:
            raise ValueError("these heads read the root token: pass root=model.get_input_embeddings()(root_ids)")

    def forward(
        self, hidden: torch.Tensor, lm_head: nn.Module | None = None, num_heads: int | None = None,
        root: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """[..., H] -> logits [..., K, V]; `lm_head` is the base model's (unless own projections),
        `root` the root tokens' input embeddings for `root_token` heads."""
        z = self.features(hidden, num_heads, root)
        if self.projections is not None:
            return torch.stack([p(z[..., k, :]) for k, p in enumerate(self.projections[: z.shape[-2]])], dim=-2)
        if lm_head is None:
            raise ValueError("these heads feed the base model's LM head: pass lm_head=model.get_output_embeddings()")
        return lm_head(z.to(lm_head.weight.dtype))

    def draft_logits(
        self, hidden: torch.Tensor, lm_head: nn.Module | None = None, num_heads: int | None = None,
        root: torch.Tensor | None = None, packed: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(logits [..., K, V'], ids [V'] or None): the heads' logits over `draft_vocab` only
        (all of the vocabulary without one); logits[..., j] belongs to token ids[j].

        With `packed`, where the block-format kernel is built (`kernels.block_linear.ready`)
        and the shapes allow, the products read Q8_0 copies of the blocks' and the LM-head
        rows' weights (a quarter of fp32's bytes, and a drafting step on CPU costs its bytes):
        the logits differ from fp32 by Q8_0's rounding, which can only move drafts, never what
        verification accepts."""
        if self.draft_vocab is None or self.projections is not None:
            return self(hidden, lm_head, num_heads, root), None
        if lm_head is None:
            raise ValueError("these heads feed the base model's LM head: pass lm_head=model.get_output_embeddings()")
        w = lm_head.weight
        key = (id(w), w._version, w.device, w.dtype, tuple(p._version for p in self.blocks.parameters()))
        if self._draft_weight is None or self._draft_weight[0] != key:
            vocab = self.draft_vocab.to(w.device)
            bias = getattr(lm_head, "bias", None)
            self._draft_weight = (key, w.detach()[vocab], None if bias is None else bias.detach()[vocab], vocab, None)
        _, sub_w, sub_b, vocab, pack = self._draft_weight
        if packed and pack is None:
            pack = self._pack(sub_w)
            self._draft_weight = self._draft_weight[:4] + (pack,)
        if packed and pack and hidden.dtype == torch.float32 and hidden.device.type == "cpu":
            from propd_compile.kernels.block_linear import block_linear

            blocks, lm = pack
            self._check_root(root)
            z = blocks(hidden, num_heads or self.num_heads, root)
            logits = block_linear(z, lm)[..., : len(vocab)]
            return logits if sub_b is None else logits + sub_b, vocab
        z = self.features(hidden, num_heads, root).to(w.dtype)
        return F.linear(z, sub_w, sub_b), vocab

    def _pack(self, sub_w: torch.Tensor) -> tuple:
        """(blocks over Q8_0 weights, the Q8_0 LM-head rows padded to whole tiles), or () where
        the kernel is not built or a weight's shape does not tile."""
        from propd_compile.kernels.block_linear import TILE, nearest_q8_0, ready

        if sub_w.dtype != torch.float32 or sub_w.device.type != "cpu" or not ready():
            return ()
        try:
            rows = torch.cat([sub_w.detach(), sub_w.new_zeros((-len(sub_w) % TILE, sub_w.shape[1]))])
            lm = nearest_q8_0(rows)
            blocks = _PackedBlocks(self.blocks)
        except ValueError as e:  # a shape the kernel's tiles do not fit
            log.info("draft heads stay fp32: %s", e)
            return ()
        return blocks, lm

    # --- persistence ---------------------------------------------------------------------------
    def config_dict(self) -> dict:
        return {
            "format": FORMAT, "version": VERSION, "num_heads": self.num_heads, "hidden_size": self.hidden_size,
            "vocab_size": self.vocab_size, "own_projection": self.own_projection, "base_model": self.base,
            "root_token": self.root_token, "embed_size": self.embed_size,
        }

    def save(self, directory: str | Path, dtype: torch.dtype = torch.float16, accuracy: dict | None = None) -> Path:
        from safetensors.torch import save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        tensors = {k: v.detach().to("cpu", dtype).contiguous() for k, v in self.state_dict().items()}
        if self.draft_vocab is not None:
            tensors[DRAFT_VOCAB] = self.draft_vocab.detach().to("cpu", torch.int64).contiguous()
        save_file(tensors, str(directory / WEIGHTS), metadata={"format": FORMAT})
        (directory / CONFIG).write_text(json.dumps(self.config_dict(), indent=1) + "\n")
        accuracy = accuracy if accuracy is not None else self.accuracy
        if accuracy is not None:
            (directory / ACCURACY).write_text(json.dumps(accuracy, indent=1) + "\n")
        return directory

    @classmethod
    def load(cls, directory: str | Path, model: nn.Module | None = None) -> "MedusaHeads":
        """Heads from `directory`; with `model`, refuse heads trained for another model."""
        from safetensors.torch import load_file

        directory = Path(directory)
        cfg_path = directory / CONFIG
        if not cfg_path.exists() or not (directory / WEIGHTS).exists():
            raise FileNotFoundError(
                f"no draft heads in {directory} (expected {CONFIG} and {WEIGHTS}); train some with "
                "`propd train-heads --model NAME --out DIR`"
            )
        cfg = json.loads(cfg_path.read_text())
        if cfg.get("format") != FORMAT:
            raise ValueError(f"{cfg_path} is not a propd heads config (format {cfg.get('format')!r})")
        if cfg.get("version", 0) > VERSION:
            raise ValueError(f"{cfg_path} has heads format version {cfg['version']}; this propd reads up to {VERSION}")
        if model is not None:
            why = identity_mismatch(cfg["base_model"], model)
            if why:
                raise ValueError(
                    f"the draft heads in {directory} do not fit this model: {why}. Train heads for it with "
                    "`propd train-heads --model NAME --out DIR` and pass ProPDConfig(heads=DIR)"
                )
        heads = cls(
            cfg["hidden_size"], cfg["vocab_size"], cfg["num_heads"], cfg["own_projection"], cfg["base_model"],
            cfg.get("root_token", False), cfg.get("embed_size"),
        )
        state = load_file(str(directory / WEIGHTS))
        heads.draft_vocab = state.pop(DRAFT_VOCAB, None)
        heads.load_state_dict({k: v.float() for k, v in state.items()})
        if (directory / ACCURACY).exists():
            heads.accuracy = json.loads((directory / ACCURACY).read_text())
        return heads.eval()


# --- finding heads for a model ---------------------------------------------------------------
def shipped_heads_for(model: nn.Module, root: Path = SHIPPED_DIR) -> Path | None:
    """The directory of packaged heads trained for `model`, if any."""
    return shipped_dir_for(model, root, FORMAT)


def shipped_dir_for(model: nn.Module, root: Path, fmt: str) -> Path | None:
    """The subdirectory of `root` whose config.json has format `fmt` and was made for `model`."""
    if not root.is_dir():
        return None
    for cfg_path in sorted(root.glob(f"*/{CONFIG}")):
        try:
            cfg = json.loads(cfg_path.read_text())
            if cfg.get("format") == fmt and identity_mismatch(cfg["base_model"], model) is None:
                return cfg_path.parent
        except (OSError, ValueError, KeyError, TypeError) as e:
            log.warning("ignoring unreadable config %s: %s", cfg_path, e)
    return None


def resolve_heads(model: nn.Module, path: str | Path | None) -> MedusaHeads | None:
    """Heads at `path` (checked against `model`), else shipped heads for `model`, else None.

    Loaded heads are moved to the model's device and dtype, and kept (per path) in an
    accelerated model's state.
    """
    from propd_compile.state import built_for

    if path is None:
        path = built_for(model, ("shipped heads",), lambda: shipped_heads_for(model))
        if path is None:
            return None

    def load() -> MedusaHeads:
        check_hidden_logits(model)
        param = next(model.parameters())
        return MedusaHeads.load(path, model).to(param.device, param.dtype)

    return built_for(model, ("heads", str(Path(path).resolve())), load)


@torch.no_grad()
def check_hidden_logits(model: nn.Module) -> None:
    """Heads need logits = LMHead(base model's last hidden state); refuse models that rescale them."""
    ids = torch.tensor([[1, 2, 3]], device=next(model.parameters()).device) % _text_config(model).vocab_size
    full = model(input_ids=ids, use_cache=False).logits
    split = model.get_output_embeddings()(model.base_model(input_ids=ids, use_cache=False).last_hidden_state)
    if full.shape != split.shape or not torch.allclose(full, split, rtol=1e-4, atol=1e-4):
        raise NotImplementedError(
            f"{type(model).__name__} computes its logits with more than its LM head on the last hidden state "
            "(e.g. logit soft-capping or scaling); draft heads are not supported for it yet, use drafters=('ngram',)"
        )


# --- trees from the heads' top-k ---------------------------------------------------------------
def rank_paths(table: Sequence[Sequence[float]], budget: int) -> list[tuple[tuple[int, ...], float]]:
    """Best-first: the `budget - 1` rank paths with the largest products of table[depth][rank].

    Every node at depth d has the same children, ranks r with factor table[d][r] in [0, 1]; a
    path's score is the product along it. A node enters the frontier only after its parent (as
    its parent's best child) or its next better sibling was taken, and scores no higher than
    either, so any prefix of the result is an ancestor-closed tree; paths come out in pop order
    (scores non-increasing), parents before children. Each pop adds at most two paths to the
    frontier (the next sibling, the best child), not a node's whole row of children: drafting
    runs this every step.
    """
    import heapq

    if budget <= 1 or not table:
        return []
    order = [sorted(range(len(row)), key=lambda r: -float(row[r])) for row in table]  # ranks, best factor first
    # (-score, path, index of the path's last rank in its depth's order, the parent's score)
    heap = [(-float(table[0][order[0][0]]), (order[0][0],), 0, 1.0)]
    out: list[tuple[tuple[int, ...], float]] = []
    while heap and len(out) < budget - 1:
        neg, path, k, parent = heapq.heappop(heap)
        out.append((path, -neg))
        d = len(path)
        if k + 1 < len(order[d - 1]):
            r = order[d - 1][k + 1]
            heapq.heappush(heap, (-parent * float(table[d - 1][r]), path[:-1] + (r,), k + 1, parent))
        if d < len(table):
            r = order[d][0]
            heapq.heappush(heap, (neg * float(table[d][r]), path + (r,), 0, -neg))
    return out
