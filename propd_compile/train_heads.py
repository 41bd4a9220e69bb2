"""`propd train-heads`: Medusa heads by self-distillation, offline, on CPU.

1. Prompts written by the model itself: seed instructions over generic topics (below) in the
   chat template, sampled; cleaned, deduplicated, and anything close to an MT-Bench turn dropped
   (word Jaccard >= 0.3 or a shared word 5-gram against all 80 x 2 turns: MT-Bench is for
   evaluation only).
2. Answers by the base model, greedy, batched with left padding. A pre-hook on the LM head
   records the hidden state that produced every answer token, so no second forward is needed;
   hidden states (fp16) and answer tokens are cached to disk shard by shard.
3. Head training: head k at the hidden state that predicts answer token j (and, for root-token
   heads, reads j's embedding) learns token j+k+1 (cross-entropy against the base model's own
   greedy tokens, softmax over the tokens seen as targets, which become the heads' draft
   vocabulary), AdamW with cosine decay, the base model frozen. A held-out split (by prompt)
   gives per-head top-1/top-5 accuracy and the per-(head, rank) accuracies that the static
   Medusa tree and the dynamic tree's rank statistics start from.
4. Evaluation on MT-Bench: the base model's greedy answers to the 80 turn-1 questions (cached
   apart from the training data, never trained on) give the accuracy users can expect on chat.

Every stage resumes: prompts and answer shards already on disk are kept, and training restarts
from the checkpoint of the last finished epoch (`OUT/work/`).

Defaults, sized for the embedded SmolLM2-135M-Instruct on 2 CPU cores within an hour. Measured
rates: prompt writing ~2.4 kept prompts/s quiet, 0.5 contended (1280 prompts: 9 min quiet);
greedy answers ~180-220 tokens/s at batch 64 quiet, 45 contended (1280 answers of ~156 tokens:
~17 min quiet); training 0.17 s per step of 256 positions for root-token heads with 1 thread
(4 epochs over ~180k positions: ~8 min); MT-Bench answers once, ~2 min quiet. About 40 minutes
quiet in all; on a machine shared with other jobs the answers stage alone took 45 minutes for
768 prompts (the shipped heads' run, propd_compile/data/heads/smollm2-135m-instruct/README.md).
"""
from __future__ import annotations

import json
import logging
import math
import random
import re
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Sequence

import torch
from torch.nn import functional as F

from propd_compile.distill_data import check_work_settings
from propd_compile.heads import MedusaHeads

log = logging.getLogger(__name__)

# Generic seed topics and instruction styles, written for this trainer (not from any benchmark).
TOPICS = (
    "cooking pasta", "baking bread", "growing tomatoes", "houseplants", "composting", "bird watching",
    "dog training", "cat behaviour", "aquariums", "beekeeping", "cycling to work", "running shoes",
    "swimming technique", "yoga for beginners", "sleep habits", "drinking enough water", "budgeting",
    "saving for retirement", "renting an apartment", "moving house", "job interviews", "writing a CV",
    "learning a language", "studying for exams", "time management", "public speaking", "photography",
    "painting with watercolours", "learning the guitar", "choosing a laptop", "backing up files",
    "password safety", "spreadsheets", "learning Python", "web browsers", "electric cars", "trains",
    "planning a road trip", "camping", "hiking safety", "packing a suitcase", "volcanoes", "the Moon",
    "rainbows", "tides", "clouds", "recycling", "solar panels", "saving energy at home", "coffee",
    "tea", "chocolate", "cheese making", "board games", "chess openings", "knitting", "woodworking",
    "fixing a bicycle", "painting a room", "bees and flowers", "dinosaurs", "ancient Egypt",
    "the printing press", "libraries", "museums", "first aid", "vitamins", "dentists", "friendship",
    "birthday parties", "weddings", "gift ideas", "email etiquette", "note taking", "maps", "weather",
)
STYLES = (
    "Write one question a curious person might ask about {topic}. Reply with the question only.",
    "Write a short request asking an assistant for practical tips about {topic}. Reply with the request only.",
    "Write one question a beginner could ask about {topic}. Only write the question.",
    "Write a short instruction asking for a simple explanation of something about {topic}. Only the instruction.",
    "Write a question someone could ask a friend who knows a lot about {topic}. Reply with the question only.",
    # task types, so the answers cover writing, arithmetic, code, role play, extraction and comparison
    "Write a request asking an assistant to write a short poem or story about {topic}. Reply with the request only.",
    "Write a request asking an assistant to draft a friendly email about {topic}. Reply with the request only.",
    "Write a simple math word problem about {topic} that needs a few calculation steps. Reply with the problem only.",
    "Write a request asking for a short Python function that would help with {topic}. Reply with the request only.",
    "Write a request asking an assistant to pretend to be an expert in {topic} and give advice. Reply with the request only.",
    "Write two sentences of facts about {topic}, then ask for the key facts as a list. Reply with that text only.",
    "Write a question asking to compare two options related to {topic}. Reply with the question only.",
)


@dataclass
class TrainSettings:
    num_heads: int = 4
    num_prompts: int = 1280  # self-written prompts to keep
    prompt_tokens: int = 40  # longest sampled prompt
    answer_tokens: int = 256  # longest greedy answer
    gen_batch_size: int = 64
    temperature: float = 0.8
    top_p: float = 0.9
    epochs: int = 4
    batch_size: int = 256  # positions per step
    lr: float = 1e-3
    weight_decay: float = 0.0
    holdout: float = 0.1
    ranks: int = 10  # ranks for the per-(head, rank) accuracies
    own_projection: bool = False
    root_token: bool = True  # heads also read the root token's embedding (heads.RootBlock)
    eval_mt_bench: bool = True  # also report accuracy on greedy answers to MT-Bench (never trained on)
    save_dtype: str = "float16"
    seed: int = 0
    max_positions: int | None = None  # cap on training positions (None: all)
    # "seen": the training softmax runs over the tokens that occur as targets (the model's answers
    # use a few thousand of the 49k), ~10x cheaper steps; evaluation always uses the full vocab.
    train_vocab: str = "seen"


# --- prompts -----------------------------------------------------------------------------------
_WORD = re.compile(r"[a-z0-9]+")


def words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def _ngrams(ws: Sequence[str], n: int) -> set[tuple[str, ...]]:
    return {tuple(ws[i : i + n]) for i in range(len(ws) - n + 1)}


class BenchmarkFilter:
    """Is a text close to any benchmark turn? Word Jaccard >= `jaccard` or a shared word n-gram."""

    def __init__(self, texts: Sequence[str], jaccard: float = 0.3, n: int = 5) -> None:
        self.jaccard, self.n = jaccard, n
        self.sets = [set(words(t)) for t in texts]
        self.grams: set[tuple[str, ...]] = set()
        for t in texts:
            self.grams |= _ngrams(words(t), n)

    @classmethod
    def mt_bench(cls) -> "BenchmarkFilter":
        from propd_compile.prompts import mt_bench

        return cls([turn for q in mt_bench() for turn in q.turns])

    def close(self, text: str) -> bool:
        ws = words(text)
        s = set(ws)
        if _ngrams(ws, self.n) & self.grams:
            return True
        return any(len(s & b) / max(len(s | b), 1) >= self.jaccard for b in self.sets)


_CHATTER = re.compile(
    r"^(i'm|i am|i'd|i would|i'll|i will|i can|let's|here|sure|certainly|of course|what a|great|as an|please)\b", re.I
)


def clean_prompt(text: str) -> str | None:
    """A usable prompt from a sampled one, or None.

    A quoted span of 4+ words wins; else the first line, cut after its first question mark,
    with "Question:"-style labels removed. Assistant chatter ("Sure", "Here is", "I'm") and
    prompts outside 4..50 words are dropped.
    """
    text = text.strip()
    quoted = [q.strip() for q in re.findall(r'["“]([^"“”]+)["”]', text) if len(words(q)) >= 4]
    if quoted:
        line = quoted[0]
    else:
        lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
        if not lines:
            return None
        line = lines[0]
        if "?" in line:
            line = line[: line.index("?") + 1]
    line = re.sub(r"^(\W*(question|request|instruction|task|q)\s*\d*\s*[:\-]\s*)+", "", line, flags=re.I)
    line = line.strip().strip('"“”\'*').strip()
    n = len(words(line))
    if n < 4 or n > 50 or _CHATTER.match(line) or not re.search(r"[a-zA-Z]", line):
        return None
    return line


class PromptPool:
    """Kept prompts, growing one candidate at a time: exact (normalised) and near duplicates
    (word Jaccard >= `near`) and texts close to the benchmark are dropped."""

    def __init__(self, bench: BenchmarkFilter | None = None, near: float = 0.8) -> None:
        self.bench, self.near = bench, near
        self.kept: list[str] = []
        self.sets: list[set[str]] = []
        self.seen: set[str] = set()

    def add(self, text: str) -> bool:
        key = " ".join(words(text))
        if key in self.seen:
            return False
        s = set(key.split())
        if any(len(s & o) / max(len(s | o), 1) >= self.near for o in self.sets):
            return False
        if self.bench is not None and self.bench.close(text):
            return False
        self.seen.add(key)
        self.kept.append(text)
        self.sets.append(s)
        return True


def dedupe(texts: Sequence[str], near: float = 0.8) -> list[str]:
    """Drop exact (normalised) duplicates and near duplicates (word Jaccard >= `near`)."""
    pool = PromptPool(None, near)
    for t in texts:
        pool.add(t)
    return pool.kept


def _left_pad(rows: Sequence[Sequence[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    P = max(len(r) for r in rows)
    ids = torch.full((len(rows), P), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), P), dtype=torch.long)
    for b, r in enumerate(rows):
        ids[b, P - len(r) :] = torch.tensor(r, dtype=torch.long)
        mask[b, P - len(r) :] = 1
    return ids, mask


def _eos_pad(model) -> tuple[list[int], int]:
    gen = model.generation_config
    eos = gen.eos_token_id if gen.eos_token_id is not None else model.config.eos_token_id
    eos = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
    pad = gen.pad_token_id if gen.pad_token_id is not None else model.config.pad_token_id
    return eos, (pad if pad is not None else (eos[0] if eos else 0))


@torch.no_grad()
def write_prompts(model, tokenizer, settings: TrainSettings, work: Path, bench: BenchmarkFilter | None) -> list[str]:
    """Self-written prompts (resumable: sampled batches are appended to prompts_raw.jsonl)."""
    from tqdm.auto import tqdm

    final = work / "prompts.json"
    if final.exists():
        return json.loads(final.read_text())
    raw_path = work / "prompts_raw.jsonl"
    raw = [json.loads(x) for x in raw_path.read_text().splitlines()] if raw_path.exists() else []
    eos, pad = _eos_pad(model)
    rng = random.Random(settings.seed)
    seeds = [s.format(topic=t) for t in TOPICS for s in STYLES]
    rng.shuffle(seeds)

    pool = PromptPool(bench)

    def offer(text: str) -> None:
        cleaned = clean_prompt(text)
        if cleaned:
            pool.add(cleaned)

    for r in raw:
        offer(r["text"])
    B = settings.gen_batch_size
    batch_no = len(raw) // B
    bar = tqdm(total=settings.num_prompts, desc="writing prompts", unit="prompt")
    bar.update(min(len(pool.kept), settings.num_prompts))
    t0, n_tok = time.perf_counter(), 0
    while len(pool.kept) < settings.num_prompts and batch_no * B < 20 * settings.num_prompts:
        instr = [seeds[(batch_no * B + i) % len(seeds)] for i in range(B)]
        rows = [
            tokenizer.apply_chat_template([{"role": "user", "content": x}], add_generation_prompt=True, tokenize=True)
            for x in instr
        ]
        rows = [r["input_ids"] if isinstance(r, dict) or hasattr(r, "keys") else r for r in rows]
        ids, mask = _left_pad(rows, pad)
        torch.manual_seed(settings.seed * 100003 + batch_no)
        out = model.generate(
            ids, attention_mask=mask, do_sample=True, temperature=settings.temperature, top_p=settings.top_p,
            top_k=0, max_new_tokens=settings.prompt_tokens, pad_token_id=pad, eos_token_id=eos,
        )
        new = out[:, ids.shape[1] :]
        n_tok += int((~torch.isin(new, torch.tensor(eos + [pad]))).sum())
        texts = tokenizer.batch_decode(new, skip_special_tokens=True)
        with open(raw_path, "a") as f:
            for i, t in zip(instr, texts):
                f.write(json.dumps({"instruction": i, "text": t}) + "\n")
                raw.append({"instruction": i, "text": t})
                offer(t)
        batch_no += 1
        bar.n = min(len(pool.kept), settings.num_prompts)
        bar.set_postfix(tok_s=f"{n_tok / (time.perf_counter() - t0):.0f}")
        bar.refresh()
    bar.close()
    prompts = pool.kept[: settings.num_prompts]
    log.info("kept %d of %d sampled prompts", len(prompts), len(raw))
    final.write_text(json.dumps(prompts, indent=0))
    return prompts


# --- answers and hidden states ------------------------------------------------------------------
@torch.no_grad()
def answer_and_cache(model, prompt_rows: Sequence[Sequence[int]], settings: TrainSettings, work: Path) -> dict:
    """Greedy answers and the hidden state behind every answer token, one shard per batch.

    Shard i holds `hidden` [n, H] fp16 and per answer its tokens; the hidden rows of an answer
    with tokens a_0..a_{m-1} are h_0..h_{m-1}, h_j being the LM head's input that produced a_j.
    """
    from tqdm.auto import tqdm

    shards = work / "answers"
    shards.mkdir(parents=True, exist_ok=True)
    eos, pad = _eos_pad(model)
    order = sorted(range(len(prompt_rows)), key=lambda i: len(prompt_rows[i]))  # less padding
    B = settings.gen_batch_size
    batches = [order[i : i + B] for i in range(0, len(order), B)]
    lm_head = model.get_output_embeddings()
    captured: list[torch.Tensor] = []

    def hook(_module, args):
        captured.append(args[0][:, -1].detach().to(torch.float16).cpu())

    stats = {"tokens": 0, "seconds": 0.0}
    bar = tqdm(total=len(batches), desc="answering (greedy)", unit="batch")
    for i, idx in enumerate(batches):
        path = shards / f"{i:05d}.pt"
        if path.exists():
            bar.update(1)
            continue
        ids, mask = _left_pad([prompt_rows[j] for j in idx], pad)
        captured.clear()
        handle = lm_head.register_forward_pre_hook(hook)
        t0 = time.perf_counter()
        try:
            out = model.generate(
                ids, attention_mask=mask, do_sample=False, max_new_tokens=settings.answer_tokens,
                pad_token_id=pad, eos_token_id=eos,
            )
        finally:
            handle.remove()
        dt = time.perf_counter() - t0
        new = out[:, ids.shape[1] :]
        hidden = torch.stack(captured[: new.shape[1]], dim=1)  # [b, N, H]
        answers, rows = [], []
        for b in range(len(idx)):
            toks = new[b].tolist()
            n = len(toks)
            for k, t in enumerate(toks):
                if t in eos:
                    n = k + 1
                    break
            answers.append(toks[:n])
            rows.append(hidden[b, :n])
        torch.save({"prompt_index": idx, "answers": answers, "hidden": torch.cat(rows)}, path.with_suffix(".part"))
        path.with_suffix(".part").rename(path)
        n_tok = sum(len(a) for a in answers)
        stats["tokens"] += n_tok
        stats["seconds"] += dt
        bar.update(1)
        bar.set_postfix(tok_s=f"{stats['tokens'] / max(stats['seconds'], 1e-9):.0f}")
    bar.close()
    return stats


def load_dataset(work: Path, num_heads: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(hidden [N, H] fp16, root [N] the token each hidden state produced, targets [N, K] long
    with -100 past the answer, example id [N])."""
    hs, rs, ts, ex = [], [], [], []
    for path in sorted((work / "answers").glob("*.pt")):
        shard = torch.load(path, weights_only=True)
        hs.append(shard["hidden"])
        for pid, ans in zip(shard["prompt_index"], shard["answers"]):
            m = len(ans)
            tgt = torch.full((m, num_heads), -100, dtype=torch.long)
            a = torch.tensor(ans, dtype=torch.long)
            rs.append(a)
            for k in range(num_heads):
                if m > k + 1:
                    tgt[: m - k - 1, k] = a[k + 1 :]
            ts.append(tgt)
            ex.append(torch.full((m,), int(pid), dtype=torch.long))
    if not hs:
        raise RuntimeError(f"no cached answers in {work / 'answers'}")
    hidden, root, targets, example = torch.cat(hs), torch.cat(rs), torch.cat(ts), torch.cat(ex)
    keep = (targets != -100).any(1)
    return hidden[keep], root[keep], targets[keep], example[keep]


# --- training ------------------------------------------------------------------------------------
def _head_loss(
    heads: MedusaHeads, lm_head, x: torch.Tensor, e: torch.Tensor | None, y: torch.Tensor, vocab: torch.Tensor | None
) -> torch.Tensor:
    """Cross-entropy of every head (e: root embeddings); with `vocab`, the softmax runs over
    those tokens only and y indexes into them."""
    if vocab is None:
        logits = heads(x, lm_head, root=e)  # [b, K, V]
    else:
        bias = lm_head.bias[vocab] if getattr(lm_head, "bias", None) is not None else None
        z = heads.features(x, root=e).to(lm_head.weight.dtype)
        logits = F.linear(z, lm_head.weight[vocab], bias)  # [b, K, |vocab|]
    return F.cross_entropy(logits.flatten(0, 1).float(), y.flatten(), ignore_index=-100)


@torch.no_grad()
def evaluate(
    heads: MedusaHeads, model, hidden: torch.Tensor, root: torch.Tensor, targets: torch.Tensor, ranks: int, batch: int = 512
) -> dict:
    """Per head: top-1, top-5 and P(rank-r prediction is the target) for r < ranks."""
    K = heads.num_heads
    hits = torch.zeros(K, ranks)
    count = torch.zeros(K)
    lm_head = model.get_output_embeddings()
    for i in range(0, len(hidden), batch):
        x, y = hidden[i : i + batch].float(), targets[i : i + batch]
        e = _root_embeddings(model, heads, root[i : i + batch])
        logits, vocab = heads.draft_logits(x, lm_head, root=e)  # what the drafter sees
        top = logits.topk(min(ranks, logits.shape[-1]), dim=-1).indices  # [b, K, R]
        if vocab is not None:
            top = vocab[top]
        top = F.pad(top, (0, ranks - top.shape[-1]), value=-1)  # fewer draftable tokens than ranks
        valid = y != -100
        hits += ((top == y[..., None]) & valid[..., None]).sum(0).float()
        count += valid.sum(0).float()
    rank_acc = (hits / count.clamp(min=1)[:, None]).tolist()
    return {
        "rank_accuracy": [[round(a, 5) for a in row] for row in rank_acc],
        "top1": [round(row[0], 4) for row in rank_acc],
        "top5": [round(sum(row[:5]), 4) for row in rank_acc],
        "positions": [int(c) for c in count],
    }


def _root_embeddings(model, heads: MedusaHeads, root: torch.Tensor) -> torch.Tensor | None:
    return model.get_input_embeddings()(root).float() if heads.root_token else None


def train(model, work: Path, settings: TrainSettings) -> tuple[MedusaHeads, dict]:
    from tqdm.auto import tqdm

    hidden, root, targets, example = load_dataset(work, settings.num_heads)
    ids = sorted(set(example.tolist()))
    rng = random.Random(settings.seed)
    rng.shuffle(ids)
    n_hold = max(1, round(len(ids) * settings.holdout)) if len(ids) > 1 else 0
    held = torch.isin(example, torch.tensor(ids[:n_hold], dtype=torch.long))
    tr_h, tr_r, tr_t = hidden[~held], root[~held], targets[~held]
    if settings.max_positions is not None:
        tr_h, tr_r, tr_t = tr_h[: settings.max_positions], tr_r[: settings.max_positions], tr_t[: settings.max_positions]
    ho_h, ho_r, ho_t = hidden[held], root[held], targets[held]
    if len(ho_h) == 0:  # a single example: evaluate on the training data
        ho_h, ho_r, ho_t = tr_h, tr_r, tr_t

    torch.manual_seed(settings.seed)
    heads = MedusaHeads.for_model(model, settings.num_heads, settings.own_projection, settings.root_token)
    lm_head = model.get_output_embeddings()
    vocab = None
    if settings.train_vocab == "seen" and not settings.own_projection:
        vocab = torch.unique(tr_t[tr_t != -100])
        remap = torch.full((lm_head.weight.shape[0],), -100, dtype=torch.long)
        remap[vocab] = torch.arange(len(vocab))
        tr_t = torch.where(tr_t == -100, -100, remap[tr_t.clamp(min=0)])
        log.info("training softmax over %d seen tokens of %d", len(vocab), lm_head.weight.shape[0])
        heads.draft_vocab = vocab  # the heads draft only tokens they were trained to predict
    for p in model.parameters():
        p.requires_grad_(False)
    opt = torch.optim.AdamW(heads.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
    steps_per_epoch = max(1, math.ceil(len(tr_h) / settings.batch_size))
    total = steps_per_epoch * settings.epochs
    warmup = max(1, total // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, total) / total))
    )
    ckpt_path = work / "checkpoint.pt"
    epoch, history = 0, []
    ckpt = torch.load(ckpt_path, weights_only=False) if ckpt_path.exists() else None
    model_keys = ("num_heads", "root_token", "own_projection", "train_vocab", "seed", "holdout", "max_positions")
    if ckpt is not None and any(ckpt.get("settings", {}).get(k) != getattr(settings, k) for k in model_keys):
        log.warning("ignoring %s: it was trained with other settings; training restarts", ckpt_path)
        ckpt = None
    if ckpt is not None:
        heads.load_state_dict(ckpt["heads"])
        opt.load_state_dict(ckpt["optimizer"])
        sched.load_state_dict(ckpt["scheduler"])
        epoch, history = ckpt["epoch"], ckpt["history"]
        log.info("resuming head training after epoch %d", epoch)
    heads.train()
    bar = tqdm(total=total, initial=epoch * steps_per_epoch, desc="training heads", unit="step")
    step_times = []
    while epoch < settings.epochs:
        g = torch.Generator().manual_seed(settings.seed * 1000 + epoch)
        perm = torch.randperm(len(tr_h), generator=g)
        running = 0.0
        for s in range(steps_per_epoch):
            t0 = time.perf_counter()
            idx = perm[s * settings.batch_size : (s + 1) * settings.batch_size]
            e = _root_embeddings(model, heads, tr_r[idx])
            loss = _head_loss(heads, lm_head, tr_h[idx].float(), e, tr_t[idx], vocab)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            running += float(loss.detach())
            step_times.append(time.perf_counter() - t0)
            bar.update(1)
            bar.set_postfix(epoch=epoch + 1, loss=f"{running / (s + 1):.3f}")
        epoch += 1
        heads.eval()
        acc = evaluate(heads, model, ho_h, ho_r, ho_t, settings.ranks)
        heads.train()
        history.append({"epoch": epoch, "train_loss": running / steps_per_epoch, "top1": acc["top1"], "top5": acc["top5"]})
        bar.write(f"epoch {epoch}: loss {running / steps_per_epoch:.3f}, held-out top-1 {acc['top1']}, top-5 {acc['top5']}")
        tmp = ckpt_path.with_suffix(".part")
        torch.save(
            {"heads": heads.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
             "epoch": epoch, "history": history, "settings": asdict(settings)}, tmp,
        )
        tmp.rename(ckpt_path)
    bar.close()
    heads.eval()
    acc = evaluate(heads, model, ho_h, ho_r, ho_t, settings.ranks)
    acc.update(
        history=history, train_positions=len(tr_h), held_out_positions=len(ho_h),
        held_out_examples=n_hold, step_seconds=(sum(step_times) / len(step_times)) if step_times else None,
        train_vocab=len(vocab) if vocab is not None else int(lm_head.weight.shape[0]),
    )
    return heads, acc


MT_BENCH_BATCH = 40  # the 80 questions in two batches, whatever the training batch size


@torch.no_grad()
def mt_bench_accuracy(model, tokenizer, heads: MedusaHeads, work: Path, settings: TrainSettings) -> dict:
    """Per-head accuracy on the base model's greedy answers to the 80 MT-Bench turn-1 questions.

    Evaluation only: these answers never enter training (they live in `work/mt_bench`, apart
    from the training shards). Answering is cached, so re-evaluating new heads is cheap.
    """
    from propd_compile.prompts import mt_bench

    rows = []
    for q in mt_bench():
        r = tokenizer.apply_chat_template([{"role": "user", "content": q.turns[0]}], add_generation_prompt=True, tokenize=True)
        rows.append(list(r["input_ids"] if hasattr(r, "keys") else r))
    answer_and_cache(model, rows, replace(settings, gen_batch_size=MT_BENCH_BATCH), work / "mt_bench")
    hidden, root, targets, _ = load_dataset(work / "mt_bench", heads.num_heads)
    acc = evaluate(heads.eval(), model, hidden, root, targets, settings.ranks)
    acc["questions"] = len(rows)
    return acc


# --- the whole recipe ------------------------------------------------------------------------------
def train_heads(
    model,
    out: str | Path,
    *,
    tokenizer=None,
    settings: TrainSettings | None = None,
    prompts: Sequence[str] | None = None,
    prompt_ids: Sequence[Sequence[int]] | None = None,
    model_name: str | None = None,
) -> dict:
    """Self-distil Medusa heads for `model` into `out` (heads + accuracy.json); resumable.

    Prompts: self-written with `tokenizer` (default), or given as texts (`prompts`, chat
    template applied, MT-Bench-close ones dropped) or as token ids (`prompt_ids`, used as is).
    Returns the report (accuracies, timings) that also goes into accuracy.json.
    """
    settings = settings or TrainSettings()
    out = Path(out)
    work = out / "work"
    work.mkdir(parents=True, exist_ok=True)
    data_keys = ("num_prompts", "prompt_tokens", "answer_tokens", "gen_batch_size", "temperature", "top_p", "seed")
    check_work_settings(work, "settings.json", asdict(settings), data_keys)
    report: dict = {"settings": asdict(settings)}
    if model_name:
        model.name_or_path = model_name  # the identity recorded with the heads
    t_start = time.perf_counter()

    if prompt_ids is None:
        if tokenizer is None:
            raise ValueError("train_heads needs a tokenizer (to write prompts) or prompt_ids")
        t0, c0 = time.perf_counter(), time.process_time()
        if prompts is None:
            try:
                bench = BenchmarkFilter.mt_bench()
            except Exception as e:  # noqa: BLE001 - the filter is a safeguard, say so loudly
                raise RuntimeError(f"could not load MT-Bench to filter the self-written prompts: {e}") from e
            prompts = write_prompts(model, tokenizer, settings, work, bench)
        else:
            bench = BenchmarkFilter.mt_bench()
            prompts = [p for p in dedupe(prompts) if not bench.close(p)]
        report["prompts"] = {
            "count": len(prompts), "seconds": round(time.perf_counter() - t0, 1),
            "cpu_seconds": round(time.process_time() - c0, 1),
        }
        prompt_ids = []
        for p in prompts:
            r = tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True, tokenize=True)
            prompt_ids.append(list(r["input_ids"] if hasattr(r, "keys") else r))
    c0 = time.process_time()
    gen = answer_and_cache(model, prompt_ids, settings, work)
    if gen["tokens"]:
        report["answers"] = {
            "new_tokens": gen["tokens"], "seconds": round(gen["seconds"], 1),
            "tokens_per_second": round(gen["tokens"] / max(gen["seconds"], 1e-9), 1),
            "cpu_seconds": round(time.process_time() - c0, 1),
        }
    t0, c0 = time.perf_counter(), time.process_time()
    heads, acc = train(model, work, settings)
    report["training"] = {"seconds": round(time.perf_counter() - t0, 1), "cpu_seconds": round(time.process_time() - c0, 1)}
    report.update(acc)
    if tokenizer is not None and settings.eval_mt_bench:
        t0 = time.perf_counter()
        report["mt_bench"] = mt_bench_accuracy(model, tokenizer, heads, work, settings)
        report["mt_bench"]["seconds"] = round(time.perf_counter() - t0, 1)
    report["total_seconds"] = round(time.perf_counter() - t_start, 1)
    heads.save(out, dtype=getattr(torch, settings.save_dtype), accuracy=report)
    (out / "work" / "report.json").write_text(json.dumps(report, indent=1))
    return report
