"""Self-distillation data for drafters: the target's features and outputs at every position.

A teacher-forced forward over a fixed token sequence gives, at prefill speed, what generation
would only give one token per forward: at every position the hidden states entering chosen
decoder layers (the feature drafter's taps) and the final-norm hidden state, from which the
target's full next-token distribution follows through its LM head. Sequences come from

* the model's own greedy answers to prompts it wrote (`train_heads.write_prompts` and
  `train_heads.answer_and_cache`, shared with the heads trainer), and
* fixed text that registry packages ship: the docstrings of the project's own dependencies
  (transformers, torch, numpy, sympy, networkx), each chunk placed as the assistant's answer in
  the chat template and dropped when it is close to an MT-Bench turn.

Sequences go to disk shard by shard (`FEATURES/<i>.pt`, written atomically), so a stopped run
resumes at the first missing shard.
"""
from __future__ import annotations

import ast
import hashlib
import importlib.metadata
import json
import logging
import time
from pathlib import Path
from typing import Iterable, Sequence

import torch

log = logging.getLogger(__name__)

# Packages whose docstrings are the fixed text (all installed with propd-compile).
TEXT_PACKAGES = ("transformers", "torch", "numpy", "sympy", "networkx")
FIXED_TEXT_PROMPT = "Explain this part of a Python library's documentation."


def default_taps(num_layers: int) -> tuple[int, int, int]:
    """EAGLE-3's low, middle and high taps: the inputs of layers 2, L//2 and L-3 (HF
    `hidden_states` indices), made distinct and in range for shallow models."""
    low, mid, high = min(2, num_layers - 1), num_layers // 2, max(num_layers - 3, 0)
    taps = sorted({max(0, min(t, num_layers - 1)) for t in (low, mid, high)})
    while len(taps) < 3:  # very shallow models: reuse the top tap
        taps.append(taps[-1])
    return tuple(taps)  # type: ignore[return-value]


# --- fixed text ----------------------------------------------------------------------------------
def _docstrings(path: Path, min_chars: int) -> Iterable[str]:
    try:
        tree = ast.parse(path.read_text(encoding="utf-8", errors="ignore"))
    except (SyntaxError, ValueError):
        return
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and len(node.value) >= min_chars:
            text = node.value.strip()
            letters = sum(c.isalpha() for c in text)
            if letters > 0.5 * len(text) and " " in text:  # prose, not tables or encoded data
                yield text


def package_texts(packages: Sequence[str] = TEXT_PACKAGES, min_chars: int = 400) -> list[str]:
    """Long string constants (docstrings, documentation strings) of installed packages, exact
    duplicates dropped, the packages interleaved (text i of every package, then i + 1, ...)."""
    per_package, seen = [], set()
    for name in packages:
        out: list[str] = []
        per_package.append(out)
        try:
            files = importlib.metadata.files(name) or []
        except importlib.metadata.PackageNotFoundError:
            log.warning("package %s is not installed; its text is skipped", name)
            continue
        for f in sorted(str(p) for p in files if str(p).endswith(".py")):
            path = Path(importlib.metadata.distribution(name).locate_file(f))
            for text in _docstrings(path, min_chars):
                key = hashlib.sha1(text.encode()).hexdigest()
                if key not in seen:
                    seen.add(key)
                    out.append(text)
    return [texts[i] for i in range(max(map(len, per_package), default=0)) for texts in per_package if i < len(texts)]


def package_versions(packages: Sequence[str] = TEXT_PACKAGES) -> dict[str, str | None]:
    out = {}
    for name in packages:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


def chat_ids(tokenizer, user: str, answer: str | None = None) -> tuple[list[int], int]:
    """(ids, answer_start): the user turn in the chat template, then `answer` as the assistant's."""
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": user}], add_generation_prompt=True, tokenize=True)
    prompt = list(prompt["input_ids"] if hasattr(prompt, "keys") else prompt)
    if answer is None:
        return prompt, len(prompt)
    return prompt + tokenizer(answer, add_special_tokens=False)["input_ids"], len(prompt)


def fixed_text_sequences(
    tokenizer, max_tokens: int, seq_len: int, bench=None, texts: Iterable[str] | None = None
) -> tuple[list[list[int]], list[int], dict]:
    """Chat sequences of at most `seq_len` tokens over `texts` (default: package docstrings),
    about `max_tokens` answer tokens in all; chunks close to a benchmark turn (`bench.close`)
    are dropped."""
    seqs, starts = [], []
    stats = {"texts": 0, "dropped_close_to_benchmark": 0, "answer_tokens": 0}
    if texts is None:
        texts, stats["packages"] = package_texts(), package_versions()
    for text in texts:
        stats["texts"] += 1
        prompt, start = chat_ids(tokenizer, FIXED_TEXT_PROMPT)
        body = tokenizer(text, add_special_tokens=False)["input_ids"]
        room = seq_len - len(prompt)
        for i in range(0, len(body), room):
            piece = body[i : i + room]
            if len(piece) < 32:
                continue
            if bench is not None and bench.close(tokenizer.decode(piece)):
                stats["dropped_close_to_benchmark"] += 1
                continue
            seqs.append(prompt + piece)
            starts.append(start)
            stats["answer_tokens"] += len(piece)
            if stats["answer_tokens"] >= max_tokens:
                return seqs, starts, stats
    return seqs, starts, stats


# --- teacher-forced features ---------------------------------------------------------------------
@torch.no_grad()
def teacher_forced(model, ids: torch.Tensor, taps: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(features [B, N, len(taps) * H], final hidden [B, N, H]) of right-padded `ids` [B, N]
    (causal attention: padding at the end changes nothing before it)."""
    out = model.base_model(input_ids=ids, output_hidden_states=True, use_cache=False)
    feats = torch.cat([out.hidden_states[t] for t in taps], dim=-1)
    return feats, out.last_hidden_state


def feature_shards(
    model, sequences: Sequence[Sequence[int]], starts: Sequence[int], taps: Sequence[int], directory: Path,
    seqs_per_shard: int = 8, desc: str = "teacher-forced features",
) -> dict:
    """Write shards of {tokens, start, features fp16, hidden fp16} for `sequences` (resumable).

    Shard i holds sequences [i * seqs_per_shard, ...); per sequence its tokens, the index where
    its answer starts (positions before it are context only) and its features and final hidden
    states at every position.
    """
    from tqdm.auto import tqdm

    directory.mkdir(parents=True, exist_ok=True)
    n_shards = (len(sequences) + seqs_per_shard - 1) // seqs_per_shard
    done_tokens, seconds = 0, 0.0
    bar = tqdm(total=n_shards, desc=desc, unit="shard")
    for s in range(n_shards):
        path = directory / f"{s:05d}.pt"
        if path.exists():
            bar.update(1)
            continue
        idx = range(s * seqs_per_shard, min((s + 1) * seqs_per_shard, len(sequences)))
        rows = [list(sequences[i]) for i in idx]
        N = max(len(r) for r in rows)
        ids = torch.zeros((len(rows), N), dtype=torch.long)
        for b, r in enumerate(rows):
            ids[b, : len(r)] = torch.tensor(r)
        t0 = time.perf_counter()
        feats, hidden = teacher_forced(model, ids.to(next(model.parameters()).device), taps)
        seconds += time.perf_counter() - t0
        shard = {
            "tokens": rows, "start": [int(starts[i]) for i in idx], "taps": list(taps),
            "features": [feats[b, : len(r)].to("cpu", torch.float16).clone() for b, r in enumerate(rows)],
            "hidden": [hidden[b, : len(r)].to("cpu", torch.float16).clone() for b, r in enumerate(rows)],
        }
        torch.save(shard, path.with_suffix(".part"))
        path.with_suffix(".part").rename(path)
        done_tokens += sum(len(r) for r in rows)
        bar.update(1)
        bar.set_postfix(tok_s=f"{done_tokens / max(seconds, 1e-9):.0f}")
    bar.close()
    return {"tokens": done_tokens, "seconds": round(seconds, 1)}


def load_shards(directories: Sequence[Path]) -> list[dict]:
    """Every sequence of the feature shards in `directories`: dicts of tokens [n] long, start,
    features [n, F] fp16, hidden [n, H] fp16."""
    out = []
    for d in directories:
        for path in sorted(Path(d).glob("*.pt")):
            shard = torch.load(path, weights_only=True)
            for toks, start, f, h in zip(shard["tokens"], shard["start"], shard["features"], shard["hidden"]):
                out.append({"tokens": torch.tensor(toks, dtype=torch.long), "start": int(start), "features": f, "hidden": h})
    return out


def own_answer_sequences(model, tokenizer, settings, work: Path, bench) -> tuple[list[list[int]], list[int]]:
    """The model's greedy answers to prompts it wrote (the heads trainer's pipeline and cache in
    `work`), as prompt + answer sequences with the answer start."""
    from propd_compile.train_heads import answer_and_cache, write_prompts

    work.mkdir(parents=True, exist_ok=True)
    prompts = write_prompts(model, tokenizer, settings, work, bench)
    prompt_rows = [chat_ids(tokenizer, p)[0] for p in prompts]
    answer_and_cache(model, prompt_rows, settings, work)
    return answers_in(work, prompt_rows)


def answers_in(work: Path, prompt_rows: Sequence[Sequence[int]]) -> tuple[list[list[int]], list[int]]:
    """prompt + cached greedy answer per prompt (in prompt order), with the answer start."""
    by_prompt = {}
    for path in sorted((work / "answers").glob("*.pt")):
        shard = torch.load(path, weights_only=True)
        for pid, ans in zip(shard["prompt_index"], shard["answers"]):
            by_prompt[int(pid)] = ans
    seqs, starts = [], []
    for i in sorted(by_prompt):
        seqs.append(list(prompt_rows[i]) + list(by_prompt[i]))
        starts.append(len(prompt_rows[i]))
    return seqs, starts


def check_work_settings(work: Path, name: str, settings: dict, keys: Sequence[str]) -> None:
    """Refuse a work directory whose cached data were made with other `keys` of the settings;
    record `settings` there otherwise."""
    path = work / name
    if path.exists():
        old = json.loads(path.read_text())
        changed = [k for k in keys if old.get(k) != settings.get(k)]
        if changed:
            raise ValueError(
                f"{work} holds data made with other settings ({', '.join(f'{k}={old.get(k)}' for k in changed)}); "
                "use a new --out directory or delete the work directory"
            )
    path.write_text(json.dumps(settings, indent=1))


def write_json(path: Path, obj) -> None:
    tmp = path.with_suffix(".part")
    tmp.write_text(json.dumps(obj, indent=1))
    tmp.rename(path)
