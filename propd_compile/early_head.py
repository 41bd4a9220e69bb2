"""Early predictors for ProPD's early pruning: a trained early head, and the logit lens.

Both map the residual stream h after decoder layer L_e ([..., H]) to next-token logits:

  * logit lens (zero training): LMHead(FinalNorm(h)), the model's own head on an early state.
    Weak on small models (SmolLM2: top-50 recall 0.40 at layer 5 of 30, measurements.md).
  * early head: LMHead(FinalNorm(h + SiLU(W h + b))), Medusa's residual block (heads.ResBlock,
    W and b zero at init, so it starts as the logit lens) in front of the frozen final norm and
    LM head, distilled to the final layer's next token (the argmax of the full model's logits
    at the same position) with teacher-forced forwards over the heads trainer's cached prompts
    and greedy answers (`propd train-heads` work directory: prompts.json + answers/*.pt).

On disk (next to the Medusa heads): `early_head.safetensors` (W, b; fp16) and `early_head.json`
(layer, sizes, the base model's identity as heads.py records it, the recipe and the held-out
recall). `python -m propd_compile.early_head --work DIR --out DIR --layers 4 6 8` trains heads
for some layers, reports top-k recall per layer for both predictors and saves every head (in
OUT/layer<L>) and the first layer's head in OUT itself.
"""
from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path
from typing import Callable, Sequence

import torch
from torch import nn
from torch.nn import functional as F

from propd_compile.heads import ResBlock, SHIPPED_DIR, identity_mismatch, model_identity

log = logging.getLogger(__name__)

FORMAT = "propd-early-head"
VERSION = 1
WEIGHTS = "early_head.safetensors"
CONFIG = "early_head.json"
RECALL_KS = (1, 5, 20, 50, 100, 500, 1000, 4000)

Predictor = Callable[[torch.Tensor], torch.Tensor]


def final_norm(model: nn.Module) -> nn.Module:
    """The norm between the last decoder layer and the LM head (`norm`, `ln_f` or `final_layernorm`)."""
    base = model.base_model
    for name in ("norm", "ln_f", "final_layernorm"):
        if isinstance(getattr(base, name, None), nn.Module):
            return getattr(base, name)
    raise ValueError(f"{type(model).__name__}: no final norm found (looked for norm, ln_f, final_layernorm)")


def logit_lens(model: nn.Module) -> Predictor:
    """h -> LMHead(FinalNorm(h)), the zero-training early predictor."""
    norm, lm_head = final_norm(model), model.get_output_embeddings()
    return lambda h: lm_head(norm(h))


class EarlyHead(nn.Module):
    """A residual block on the layer-`layer` hidden state in front of the frozen norm + LM head."""

    def __init__(self, hidden_size: int, layer: int, base: dict | None = None, vocab: torch.Tensor | None = None) -> None:
        super().__init__()
        self.hidden_size, self.layer, self.base = hidden_size, layer, base or {}
        self.block = ResBlock(hidden_size)
        # Shortlist: the head scores only these tokens (the LM head's rows for them), ~5x cheaper
        # than the full vocabulary; kernels.early_prune.prune_keep never prunes a token outside it.
        self.vocab = vocab
        self.report: dict = {}

    @classmethod
    def for_model(cls, model: nn.Module, layer: int) -> "EarlyHead":
        return cls(model.config.get_text_config().hidden_size, layer, model_identity(model))

    def features(self, h: torch.Tensor) -> torch.Tensor:
        return self.block(h.to(self.block.linear.weight.dtype))

    def predictor(self, model: nn.Module, shortlist: bool = True) -> Predictor:
        """h -> early logits through `model`'s final norm and LM head; over `self.vocab` only
        (columns in that order) when the head has a shortlist and `shortlist` is set."""
        norm, lm_head = final_norm(model), model.get_output_embeddings()
        if not shortlist or self.vocab is None:
            return lambda h: lm_head(norm(self.features(h).to(h.dtype)))
        weight = lm_head.weight.detach()[self.vocab]
        bias = lm_head.bias.detach()[self.vocab] if getattr(lm_head, "bias", None) is not None else None
        return lambda h: F.linear(norm(self.features(h).to(h.dtype)), weight, bias)

    def save(self, directory: str | Path, recipe: dict | None = None) -> Path:
        from safetensors.torch import save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        tensors = {k: v.detach().to("cpu", torch.float16).contiguous() for k, v in self.state_dict().items()}
        if self.vocab is not None:
            tensors["vocab"] = self.vocab.to("cpu", torch.int64).contiguous()
        save_file(tensors, str(directory / WEIGHTS), metadata={"format": FORMAT})
        cfg = {"format": FORMAT, "version": VERSION, "layer": self.layer, "hidden_size": self.hidden_size,
               "base_model": self.base, "recipe": recipe or {}, "report": self.report}
        (directory / CONFIG).write_text(json.dumps(cfg, indent=1) + "\n")
        return directory

    @classmethod
    def load(cls, directory: str | Path, model: nn.Module | None = None) -> "EarlyHead":
        """The head in `directory`; with `model`, refuse a head trained for another model."""
        from safetensors.torch import load_file

        directory = Path(directory)
        if not (directory / CONFIG).exists() or not (directory / WEIGHTS).exists():
            raise FileNotFoundError(f"no early head in {directory} (expected {CONFIG} and {WEIGHTS})")
        cfg = json.loads((directory / CONFIG).read_text())
        if cfg.get("format") != FORMAT or cfg.get("version", 0) > VERSION:
            raise ValueError(f"{directory / CONFIG} is not a propd early head this version reads")
        if model is not None:
            why = identity_mismatch(cfg["base_model"], model)
            if why:
                raise ValueError(f"the early head in {directory} does not fit this model: {why}")
        tensors = load_file(str(directory / WEIGHTS))
        head = cls(cfg["hidden_size"], cfg["layer"], cfg["base_model"], tensors.pop("vocab", None))
        head.load_state_dict({k: v.float() for k, v in tensors.items()})
        head.report = cfg.get("report", {})
        return head.eval()


def shipped_early_head(model: nn.Module, root: Path = SHIPPED_DIR) -> Path | None:
    """The shipped directory holding an early head built for `model`, if any."""
    if not root.is_dir():
        return None
    for d in sorted(p for p in root.iterdir() if (p / CONFIG).exists()):
        cfg = json.loads((d / CONFIG).read_text())
        if identity_mismatch(cfg.get("base_model", {}), model) is None:
            return d
    return None


def prune_options(model: nn.Module, config) -> dict:
    """The propd backend's `prune` option for `config` (a ProPDConfig with prune=True): resolves
    the early predictor once per accelerated model and (head, layer) and registers it; sets its
    top-k from `config.prune_topk` on every call, so a new k needs no recompile."""
    from propd_compile.kernels.early_prune import get_predictor, register_predictor
    from propd_compile.state import built_for

    def build() -> tuple[int, int]:
        path = None if config.prune_head == "lens" else (config.prune_head or shipped_early_head(model))
        if path is None:
            layers = model.config.get_text_config().num_hidden_layers
            layer = config.prune_layer if config.prune_layer is not None else max(layers // 5, 1) - 1
            predictor, vocab = logit_lens(model), None
        else:
            head = EarlyHead.load(path, model)
            if config.prune_layer not in (None, head.layer):
                raise ValueError(
                    f"the early head in {path} reads layer {head.layer}, not prune_layer={config.prune_layer}; "
                    "pass prune_layer=None, prune_head='lens', or an early head trained for that layer"
                )
            layer, predictor, vocab = head.layer, head.predictor(model), head.vocab
        return layer, register_predictor(predictor, config.prune_topk, vocab)

    layer, pid = built_for(model, ("prune", config.prune_head, config.prune_layer), build)
    get_predictor(pid).topk = config.prune_topk
    return {"layer": layer, "predictor": pid}


# --- data ------------------------------------------------------------------------------------
@torch.no_grad()
def collect(model: nn.Module, sequences: Sequence[tuple[Sequence[int], Sequence[int]]], layers: Sequence[int]) -> dict:
    """Teacher-forced forwards over (prompt, answer) token pairs. Returns {"hidden": {layer: [N, H]
    fp16 residual stream after that layer}, "target": [N] the final layer's argmax, "example": [N]},
    one row per position whose next token is an answer token."""
    hidden: dict[int, list[torch.Tensor]] = {l: [] for l in layers}
    targets, examples = [], []
    for i, (prompt, answer) in enumerate(sequences):
        if not answer:
            continue
        ids = torch.tensor([list(prompt) + list(answer)])
        out = model(input_ids=ids, output_hidden_states=True)
        sl = slice(len(prompt) - 1, ids.shape[1] - 1)  # positions that predict the answer tokens
        for l in layers:
            hidden[l].append(out.hidden_states[l + 1][0, sl].to(torch.float16))
        targets.append(out.logits[0, sl].argmax(-1))
        examples.append(torch.full((len(answer),), i))
    return {"hidden": {l: torch.cat(h) for l, h in hidden.items()}, "target": torch.cat(targets),
            "example": torch.cat(examples)}


def trainer_sequences(model: nn.Module, tokenizer, work: str | Path, limit: int | None = None) -> list[tuple[list[int], list[int]]]:
    """(prompt tokens, greedy answer) pairs from a `propd train-heads` work directory."""
    work = Path(work)
    prompts = json.loads((work / "prompts.json").read_text())
    pairs = []
    for path in sorted((work / "answers").glob("*.pt")):
        shard = torch.load(path, weights_only=True)
        for pid, ans in zip(shard["prompt_index"], shard["answers"]):
            row = tokenizer.apply_chat_template([{"role": "user", "content": prompts[pid]}], add_generation_prompt=True,
                                                tokenize=True)
            row = row["input_ids"] if isinstance(row, dict) or hasattr(row, "keys") else row
            pairs.append((list(row), list(ans)))
    pairs.sort(key=lambda p: hash(tuple(p[0])) & 0xFFFF)  # a fixed shuffle: shards are length-sorted
    return pairs[:limit] if limit else pairs


def shortlist(work: str | Path) -> torch.Tensor:
    """The token ids of every cached greedy answer in a `propd train-heads` work directory (the
    tokens the model actually produces: an early head's shortlist), sorted."""
    seen = [torch.tensor(a, dtype=torch.long) for path in sorted((Path(work) / "answers").glob("*.pt"))
            for a in torch.load(path, weights_only=True)["answers"]]
    return torch.unique(torch.cat(seen))


# --- training and recall -----------------------------------------------------------------------
def train_early_head(model: nn.Module, hidden: torch.Tensor, target: torch.Tensor, layer: int, epochs: int = 3,
                     batch_size: int = 256, lr: float = 1e-3, negatives: int = 4096, seed: int = 0) -> EarlyHead:
    """Distil the final layer's next token into an early head on `hidden` (layer `layer`).

    Sampled softmax: each batch's softmax runs over every token that occurs as a target (the
    model's own answers) plus `negatives` random vocabulary entries, so tokens never seen as
    targets are pushed down too; several times cheaper than the full vocabulary."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    head = EarlyHead.for_model(model, layer)
    norm, lm_head = final_norm(model), model.get_output_embeddings()
    weight = lm_head.weight.detach()
    bias = lm_head.bias.detach() if getattr(lm_head, "bias", None) is not None else None
    seen = torch.unique(target)
    for p in model.parameters():
        p.requires_grad_(False)
    opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=0.0)
    n = hidden.shape[0]
    for epoch in range(epochs):
        perm = torch.randperm(n, generator=g)
        total = 0.0
        for i in range(0, n, batch_size):
            j = perm[i : i + batch_size]
            cand = torch.unique(torch.cat([seen, torch.randint(weight.shape[0], (negatives,), generator=g)]))
            logits = F.linear(norm(head.features(hidden[j].float())), weight[cand], None if bias is None else bias[cand])
            loss = F.cross_entropy(logits, torch.searchsorted(cand, target[j]))
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += loss.item() * len(j)
        log.info("early head layer %d epoch %d: loss %.3f", layer, epoch, total / n)
    return head.eval()


@torch.no_grad()
def topk_recall(predictor: Predictor, hidden: torch.Tensor, target: torch.Tensor, ks: Sequence[int] = RECALL_KS,
                batch_size: int = 512) -> dict[int, float]:
    """How often the final layer's next token is in the predictor's top-k, per k."""
    hits = torch.zeros(len(ks))
    kmax = max(ks)
    for i in range(0, hidden.shape[0], batch_size):
        top = predictor(hidden[i : i + batch_size].float()).topk(kmax, -1).indices
        eq = top == target[i : i + batch_size, None]
        hits += torch.stack([eq[:, :k].any(-1).sum() for k in ks]).float()
    return {k: float(h) / max(hidden.shape[0], 1) for k, h in zip(ks, hits)}


def recall_table(model: nn.Module, data: dict, heads: dict[int, EarlyHead], holdout: torch.Tensor,
                 ks: Sequence[int] = RECALL_KS) -> dict[int, dict[str, dict[int, float]]]:
    """{layer: {"logit_lens": recall@k, "early_head": recall@k}} on the held-out rows."""
    out = {}
    lens = logit_lens(model)
    for layer, h in data["hidden"].items():
        row = {"logit_lens": topk_recall(lens, h[holdout], data["target"][holdout], ks)}
        if layer in heads:
            # full vocabulary: the shortlist test's recall is at least this (see prune_keep)
            row["early_head"] = topk_recall(heads[layer].predictor(model, shortlist=False), h[holdout],
                                            data["target"][holdout], ks)
        out[layer] = row
    return out


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="train ProPD early heads and report top-k recall per layer")
    ap.add_argument("--work", required=True, help="a `propd train-heads` work directory (prompts.json, answers/)")
    ap.add_argument("--out", required=True, help="OUT/layer<L>: each head; OUT: the head of the first --layers entry")
    ap.add_argument("--layers", type=int, nargs="+", default=[6])
    ap.add_argument("--sequences", type=int, default=160, help="prompt+answer pairs used (10%% held out)")
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(args.threads)
    from propd_compile.models import load

    model, tokenizer = load()
    t0 = time.perf_counter()
    data = collect(model, trainer_sequences(model, tokenizer, args.work, args.sequences), args.layers)
    t_collect = time.perf_counter() - t0
    ex = data["example"]
    holdout = ex % 10 == 0
    heads = {}
    for layer in args.layers:
        heads[layer] = train_early_head(model, data["hidden"][layer][~holdout], data["target"][~holdout], layer,
                                        epochs=args.epochs)
        heads[layer].vocab = shortlist(args.work)
    table = recall_table(model, data, heads, holdout)
    recipe = {"work": str(args.work), "sequences": args.sequences, "positions": int((~holdout).sum()),
              "holdout_positions": int(holdout.sum()), "epochs": args.epochs, "batch_size": 256, "lr": 1e-3, "negatives": 4096,
              "target": "final-layer argmax, teacher-forced over the trainer's prompts + greedy answers",
              "collect_seconds": round(t_collect, 1), "seconds": round(time.perf_counter() - t0, 1)}
    for layer, head in heads.items():
        head.report = {"recall": table[layer]}
        head.save(Path(args.out) / f"layer{layer}", recipe)
    heads[args.layers[0]].save(args.out, recipe)
    (Path(args.out) / "early_recall.json").write_text(json.dumps({"recipe": recipe, "recall": table}, indent=1) + "\n")
    for layer, row in table.items():
        for name, rec in row.items():
            print(f"layer {layer:2d} {name:10s} " + " ".join(f"top{k}={v:.3f}" for k, v in rec.items()))


if __name__ == "__main__":
    main()
