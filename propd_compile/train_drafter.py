"""`propd train-drafter`: the feature drafter by self-distillation, offline, on CPU.

1. Data (`distill_data`): the model's greedy answers to prompts it wrote (the heads trainer's
   prompt and answer pipeline), and fixed text shipped by the project's dependencies (their
   docstrings, placed as assistant answers in the chat template, MT-Bench-close chunks dropped).
   One teacher-forced forward per sequence gives the tapped features and the final hidden state
   at every position, cached shard by shard. The base model's greedy answers to the 80 MT-Bench
   turn-1 questions are cached apart: evaluation only, never trained on.
2. Draft vocabulary: the most frequent tokens of the training answers (own answers and fixed
   text weighing the same); its coverage of the held-out MT-Bench greedy tokens is reported.
3. Training with EAGLE-3's training-time test: step 0 reads the target's features at every
   position, step j reads the drafter's own step j-1 outputs (attending to the true-feature
   prefix and its own earlier steps at that position, as a drafted path does at decode time) and
   predicts the target's distribution j tokens further on. The loss is the cross-entropy against
   the target's softmax over the draft vocabulary (its LM head on the cached final hidden state),
   weighted 0.8^j per step. AdamW, cosine decay, checkpoints every few hundred steps (resumable).
4. accuracy.json: per-depth acceptance of the greedy chain (top-1 equals the base model's greedy
   token given every earlier draft was right) and top-k hit rates, on the held-out MT-Bench
   answers, plus the vocabulary coverage and the recipe.

Every stage resumes from what is on disk under `OUT/work/`.
"""
from __future__ import annotations

import json
import logging
import math
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch.nn import functional as F

from propd_compile import distill_data

log = logging.getLogger(__name__)


@dataclass
class DrafterSettings:
    own_prompts: int = 96  # self-written prompts answered greedily (slow: ~45-200 tokens/s)
    answer_tokens: int = 256
    gen_batch_size: int = 48
    fixed_tokens: int = 400_000  # fixed-text answer tokens (teacher forced, prefill speed)
    seq_len: int = 512
    draft_vocab: int = 6144
    ttt_steps: int = 4
    step_weight: float = 0.8
    epochs: int = 1
    batch_seqs: int = 2  # sequences per optimiser step
    lr: float = 1e-3
    weight_decay: float = 0.0
    grad_clip: float = 0.5
    checkpoint_every: int = 100  # optimiser steps
    max_train_tokens: int | None = None
    save_dtype: str = "float16"
    mixed_precision: bool = True  # bf16 autocast for the draft's forward where the CPU has bf16 units
    seed: int = 0
    eval_mt_bench: bool = True


DATA_KEYS = ("own_prompts", "answer_tokens", "gen_batch_size", "fixed_tokens", "seq_len", "seed")
MT_BENCH_BATCH = 40


def _heads_settings(settings: DrafterSettings, **kw):
    from propd_compile.train_heads import TrainSettings

    fields = dict(
        num_prompts=settings.own_prompts, answer_tokens=settings.answer_tokens,
        gen_batch_size=settings.gen_batch_size, seed=settings.seed,
    )
    return TrainSettings(**{**fields, **kw})


def collect(model, tokenizer, settings: DrafterSettings, work: Path, taps) -> dict:
    """All training and evaluation features on disk (resumable); returns the data report."""
    from propd_compile.prompts import mt_bench
    from propd_compile.train_heads import BenchmarkFilter, answer_and_cache

    work.mkdir(parents=True, exist_ok=True)
    report: dict = {}
    bench = BenchmarkFilter.mt_bench()
    fixed_path = work / "fixed_text.json"
    if not fixed_path.exists():
        seqs, starts, stats = distill_data.fixed_text_sequences(tokenizer, settings.fixed_tokens, settings.seq_len, bench)
        distill_data.write_json(fixed_path, {"sequences": seqs, "starts": starts, "stats": stats})
    fixed = json.loads(fixed_path.read_text())
    report["fixed_text"] = fixed["stats"]

    t0 = time.perf_counter()
    own, own_starts = distill_data.own_answer_sequences(model, tokenizer, _heads_settings(settings), work / "own", bench)
    report["own_answers"] = {
        "sequences": len(own), "answer_tokens": sum(len(s) - st for s, st in zip(own, own_starts)),
        "seconds": round(time.perf_counter() - t0, 1),
    }
    if settings.eval_mt_bench:
        rows = [distill_data.chat_ids(tokenizer, q.turns[0])[0] for q in mt_bench()]
        answer_and_cache(model, rows, _heads_settings(settings, gen_batch_size=MT_BENCH_BATCH), work / "mt_bench")
        mt, mt_starts = distill_data.answers_in(work / "mt_bench", rows)
        distill_data.feature_shards(model, mt, mt_starts, taps, work / "mt_bench" / "features", desc="MT-Bench features")
    distill_data.feature_shards(model, own, own_starts, taps, work / "own" / "features", desc="own-answer features")
    t0 = time.perf_counter()
    distill_data.feature_shards(
        model, fixed["sequences"], fixed["starts"], taps, work / "fixed" / "features", desc="fixed-text features"
    )
    report["features_seconds"] = round(time.perf_counter() - t0, 1)
    return report


# --- draft vocabulary ------------------------------------------------------------------------------
def rank_vocab(sources: list[list[dict]], size: int, vocab_size: int) -> torch.Tensor:
    """The `size` most frequent answer tokens, sorted by id; each source (own answers, fixed text)
    weighs the same, whatever its token count, so the model's own answers are not outvoted."""
    freq = torch.zeros(vocab_size, dtype=torch.float64)
    for data in sources:
        counts = torch.zeros(vocab_size, dtype=torch.float64)
        for seq in data:
            counts += torch.bincount(seq["tokens"][seq["start"] :], minlength=vocab_size).double()
        freq += counts / counts.sum().clamp(min=1)
    return freq.argsort(descending=True, stable=True)[: min(size, vocab_size)].sort().values


def coverage(vocab: torch.Tensor, data: list[dict], vocab_size: int) -> float:
    """Share of the answer tokens in `data` that the draft vocabulary contains."""
    inside = torch.zeros(vocab_size, dtype=torch.bool)
    inside[vocab] = True
    hit = total = 0
    for seq in data:
        ans = seq["tokens"][seq["start"] :]
        hit += int(inside[ans].sum())
        total += len(ans)
    return hit / max(total, 1)


# --- training -----------------------------------------------------------------------------------
def _batch(seqs: list[dict], device) -> dict:
    """Right-padded tensors for a list of sequences."""
    N = max(len(s["tokens"]) for s in seqs)
    B = len(seqs)
    F_ = seqs[0]["features"].shape[-1]
    H = seqs[0]["hidden"].shape[-1]
    out = {
        "tokens": torch.zeros(B, N, dtype=torch.long), "features": torch.zeros(B, N, F_),
        "hidden": torch.zeros(B, N, H), "length": torch.tensor([len(s["tokens"]) for s in seqs]),
        "start": torch.tensor([s["start"] for s in seqs]),
    }
    for b, s in enumerate(seqs):
        n = len(s["tokens"])
        out["tokens"][b, :n] = s["tokens"]
        out["features"][b, :n] = s["features"].float()
        out["hidden"][b, :n] = s["hidden"].float()
    return {k: v.to(device) for k, v in out.items()}


def _target_logprobs(model, vocab: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
    """log of the target's softmax over the draft vocabulary (renormalised) at every position."""
    w = model.get_output_embeddings().weight.detach()
    bias = getattr(model.get_output_embeddings(), "bias", None)
    logits = F.linear(hidden.to(w.dtype), w[vocab], None if bias is None else bias.detach()[vocab])
    return logits.float().log_softmax(-1)


def _valid(batch: dict, step: int) -> torch.Tensor:
    """[B, N] bool: step `step` at position t is trained iff its target position u = t + step + 1
    lies in the sequence and in its answer (u >= start - 1: p_u predicts token u + 1)."""
    N = batch["tokens"].shape[1]
    u = torch.arange(N, device=batch["tokens"].device)[None] + step + 1
    return (u < batch["length"][:, None]) & (u >= batch["start"][:, None] - 1)


def bf16_autocast_available(device: torch.device) -> bool:
    """Whether bf16 autocast runs on fast units here (CUDA, or a CPU with AVX-512 BF16 / AMX):
    elsewhere bf16 matmuls are emulated and slower than fp32."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return device.type == "cpu" and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def unrolled_loss(
    draft, model, batch: dict, steps: int, weight: float, mixed_precision: bool = False
) -> tuple[torch.Tensor, list[float]]:
    """Training-time-test loss: per step, cross-entropy against the target's distribution at the
    position it predicts, weighted weight**step; also each step's mean loss. With
    `mixed_precision` the draft's forward runs under bf16 autocast (the target's distribution and
    the loss stay fp32)."""
    with torch.no_grad():
        target = _target_logprobs(model, draft.draft_vocab, batch["hidden"])  # [B, N, V']
    device = batch["features"].device
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=mixed_precision):
        logits = draft.unrolled(batch["features"], batch["tokens"], steps)
    total, per_step = 0.0, []
    for j, lg in enumerate(logits):
        valid = _valid(batch, j)
        tgt = F.pad(target[:, j + 1 :], (0, 0, 0, j + 1))
        ce = -(tgt.exp() * lg.float().log_softmax(-1)).sum(-1)
        loss_j = (ce * valid).sum() / valid.sum().clamp(min=1)
        total = total + weight**j * loss_j
        per_step.append(float(loss_j.detach()))
    return total, per_step


@torch.no_grad()
def evaluate(draft, data: list[dict], steps: int, topk: int = 8, batch_seqs: int = 4) -> dict:
    """Per-depth acceptance of the greedy draft chain on answers that are the model's own greedy
    tokens: step j at position t is right if its top-1 is token t + j + 2, and it is reached if
    steps < j were all right. Also each step's top-k hit rate (whether reached or not)."""
    device = next(draft.parameters()).device
    reached = torch.zeros(steps)
    right = torch.zeros(steps)
    topk_hits = torch.zeros(steps)
    counted = torch.zeros(steps)
    for i in range(0, len(data), batch_seqs):
        batch = _batch(data[i : i + batch_seqs], device)
        logits = draft.unrolled(batch["features"], batch["tokens"], steps)
        chain = None
        for j, lg in enumerate(logits):
            nxt = F.pad(batch["tokens"][:, j + 2 :], (0, j + 2), value=-1)  # the greedy token predicted
            valid = _valid(batch, j) & (nxt >= 0)
            top = draft.draft_vocab[lg.topk(min(topk, lg.shape[-1]), -1).indices]
            ok1 = top[..., 0] == nxt
            okk = (top == nxt[..., None]).any(-1)
            alive = valid if chain is None else (valid & chain)
            reached[j] += float(alive.sum())
            right[j] += float((alive & ok1).sum())
            topk_hits[j] += float((valid & okk).sum())
            counted[j] += float(valid.sum())
            chain = alive & ok1
    cond = (right / reached.clamp(min=1)).tolist()
    chain_tau = 1.0
    prod = 1.0
    for c in cond:
        prod *= c
        chain_tau += prod
    return {
        "acceptance": [round(c, 4) for c in cond],  # P(depth j+1 right | depths <= j right)
        "top1": [round(float(r / max(c, 1)), 4) for r, c in zip(right, reached)],
        f"top{topk}": [round(float(h / max(c, 1)), 4) for h, c in zip(topk_hits, counted)],
        "chain_tau": round(chain_tau, 3),  # expected tokens per step of a greedy draft chain + bonus
        "positions": int(counted[0]),
    }


def train(model, draft, train_data: list[dict], eval_data: list[dict], settings: DrafterSettings, work: Path) -> dict:
    from tqdm.auto import tqdm

    device = next(model.parameters()).device
    for p in model.parameters():
        p.requires_grad_(False)
    rng = random.Random(settings.seed)
    order = sorted(range(len(train_data)), key=lambda i: len(train_data[i]["tokens"]))
    batches = [order[i : i + settings.batch_seqs] for i in range(0, len(order), settings.batch_seqs)]
    if settings.max_train_tokens is not None:
        rng.shuffle(batches)
        kept, n = [], 0
        for b in batches:
            if n >= settings.max_train_tokens:
                break
            kept.append(b)
            n += sum(len(train_data[i]["tokens"]) for i in b)
        batches = kept
    total = len(batches) * settings.epochs
    opt = torch.optim.AdamW(draft.parameters(), lr=settings.lr, weight_decay=settings.weight_decay, betas=(0.9, 0.95))
    warmup = max(1, total // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, total) / total))
    )
    ckpt_path = work / "drafter_checkpoint.pt"
    step, history = 0, []
    model_keys = ("draft_vocab", "ttt_steps", "step_weight", "epochs", "batch_seqs", "lr", "seed", "max_train_tokens",
                  "mixed_precision")
    amp = settings.mixed_precision and bf16_autocast_available(device)
    if settings.mixed_precision and not amp:
        log.info("no fast bf16 on %s: the drafter trains in fp32", device)
    if ckpt_path.exists():
        ckpt = torch.load(ckpt_path, weights_only=False)
        if any(ckpt["settings"].get(k) != getattr(settings, k) for k in model_keys):
            log.warning("ignoring %s: it was trained with other settings; training restarts", ckpt_path)
        else:
            draft.load_state_dict(ckpt["draft"])
            opt.load_state_dict(ckpt["optimizer"])
            sched.load_state_dict(ckpt["scheduler"])
            step, history = ckpt["step"], ckpt["history"]
            log.info("resuming drafter training at step %d of %d", step, total)

    def save() -> None:
        tmp = ckpt_path.with_suffix(".part")
        torch.save({"draft": draft.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                    "step": step, "history": history, "settings": asdict(settings)}, tmp)
        tmp.rename(ckpt_path)

    draft.train()
    bar = tqdm(total=total, initial=step, desc="training drafter", unit="step")
    t_start, running, tokens_seen = time.perf_counter(), [], 0
    while step < total:
        epoch, k = divmod(step, len(batches))
        perm = list(range(len(batches)))
        random.Random(settings.seed * 1000 + epoch).shuffle(perm)
        batch = _batch([train_data[i] for i in batches[perm[k]]], device)
        loss, per_step = unrolled_loss(draft, model, batch, settings.ttt_steps, settings.step_weight, amp)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(draft.parameters(), settings.grad_clip)
        opt.step()
        sched.step()
        step += 1
        tokens_seen += int(batch["length"].sum())
        running.append(per_step)
        bar.update(1)
        bar.set_postfix(loss=f"{sum(r[0] for r in running[-50:]) / len(running[-50:]):.3f}",
                        tok_s=f"{tokens_seen / (time.perf_counter() - t_start):.0f}")
        if step % settings.checkpoint_every == 0 or step == total:
            recent = running[-settings.checkpoint_every :]
            history.append({"step": step, "loss_per_step": [round(sum(r[j] for r in recent) / len(recent), 4)
                                                             for j in range(settings.ttt_steps)]})
            save()
    bar.close()
    draft.eval()
    return {
        "history": history, "train_sequences": len(train_data),
        "train_positions": sum(len(train_data[i]["tokens"]) for b in batches for i in b),
        "optimizer_steps": total,
    }


# --- the whole recipe -----------------------------------------------------------------------------
def train_drafter(
    model, out: str | Path, *, tokenizer=None, settings: DrafterSettings | None = None,
    sequences: list[tuple[list[int], int]] | None = None, model_name: str | None = None,
) -> dict:
    """Self-distil a feature drafter for `model` into `out` (drafter + accuracy.json); resumable.

    Data: collected with `tokenizer` (own answers + fixed text, MT-Bench held out), or given as
    (token ids, answer start) `sequences` (the last tenth is held out for evaluation).
    """
    from propd_compile.feature_drafter import FeatureDraftModel, drafter_config, save_drafter

    settings = settings or DrafterSettings()
    out = Path(out)
    work = out / "work"
    work.mkdir(parents=True, exist_ok=True)
    distill_data.check_work_settings(work, "drafter_settings.json", asdict(settings), DATA_KEYS)
    if model_name:
        model.name_or_path = model_name
    torch.manual_seed(settings.seed)
    taps = distill_data.default_taps(model.config.get_text_config().num_hidden_layers)
    report: dict = {"settings": asdict(settings), "taps": list(taps)}
    t0 = time.perf_counter()
    if sequences is None:
        if tokenizer is None:
            raise ValueError("train_drafter needs a tokenizer (to collect data) or sequences")
        report["data"] = collect(model, tokenizer, settings, work, taps)
        sources = [distill_data.load_shards([work / "own" / "features"]), distill_data.load_shards([work / "fixed" / "features"])]
        eval_data = distill_data.load_shards([work / "mt_bench" / "features"]) if settings.eval_mt_bench else []
    else:
        n_hold = max(1, len(sequences) // 10) if len(sequences) > 1 else 0
        distill_data.feature_shards(model, [s for s, _ in sequences], [st for _, st in sequences], taps, work / "given")
        data = distill_data.load_shards([work / "given"])
        sources = [data[: len(data) - n_hold]]
        eval_data = data[len(data) - n_hold :] or data
    train_data = [seq for source in sources for seq in source]
    report["data_seconds"] = round(time.perf_counter() - t0, 1)
    report["train_answer_tokens"] = [sum(len(s["tokens"]) - s["start"] for s in source) for source in sources]
    V = model.config.get_text_config().vocab_size
    vocab = rank_vocab(sources, settings.draft_vocab, V)
    report["draft_vocab"] = {"size": int(len(vocab)), "coverage_train": round(coverage(vocab, train_data, V), 4)}
    if eval_data:
        report["draft_vocab"]["coverage_held_out"] = round(coverage(vocab, eval_data, V), 4)
    draft = FeatureDraftModel(model, taps, vocab).to(next(model.parameters()).device)
    t0 = time.perf_counter()
    report["training"] = train(model, draft, train_data, eval_data, settings, work)
    report["training"]["seconds"] = round(time.perf_counter() - t0, 1)
    if eval_data:
        t0 = time.perf_counter()
        report["held_out"] = evaluate(draft, eval_data, settings.ttt_steps)
        report["held_out"]["what"] = "MT-Bench turn-1 greedy answers (never trained on)" if sequences is None else "last tenth of the given sequences"
        report["held_out"]["seconds"] = round(time.perf_counter() - t0, 1)
    save_drafter(draft, out, {**drafter_config(model, tokenizer), "recipe": asdict(settings)},
                 dtype=getattr(torch, settings.save_dtype), accuracy=report)
    return report
