"""The model's own phrases: a corpus of its greedy answers that the n-gram drafter also matches.

Prompt lookup only finds what the prompt or the answer so far already holds. A small chat
model's greedy answers reuse its stock phrasing across answers ("Here are some tips", list and
code scaffolding, sign-offs), and greedy decoding is deterministic, so the model's own earlier
answers to other prompts predict its next tokens where the current row has nothing to copy
(retrieval drafting, after REST). The corpus holds the model's greedy answers to prompts it
wrote itself (`train_heads.write_prompts`: generic topics and task types, anything close to a
benchmark turn dropped), never benchmark text. It is static, so it is indexed once per process
with sorted n-gram hashes (numpy), and a lookup is a binary search per suffix length.

Files: `phrases.safetensors` (the token stream, answers separated by -1) and `config.json`
(format, the model's identity, the recipe). A corpus made for another model is refused, naming
both; `propd build-phrases` makes one.
"""
from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

log = logging.getLogger(__name__)

FORMAT = "propd-phrases"
VERSION = 1
CONFIG, TOKENS = "config.json", "phrases.safetensors"
SHIPPED_DIR = Path(__file__).parent / "data" / "phrases"
SEPARATOR = -1
PROMPT_TAIL = 4  # prompt tokens kept before each answer: the chat template's assistant header
_MULT_U, _MASK = 0x9E3779B97F4A7C15, (1 << 64) - 1  # an odd 64-bit multiplier; products wrap mod 2**64
_MULT = np.int64(_MULT_U - (1 << 64))


def _mix(h: np.ndarray, tok: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        return (h ^ (tok + 1)) * _MULT


def _suffix_hash(tokens: Sequence[int]) -> int:
    """The hash `PhraseIndex` gives the n-gram `tokens` (oldest first), in plain Python: the
    same bits as `_mix`, newest token first."""
    h = 0
    for t in reversed(tokens):
        h = ((h ^ (int(t) + 1)) * _MULT_U) & _MASK
    return h - (1 << 64) if h >= 1 << 63 else h


class PhraseIndex:
    """Positions that follow every n-gram (n <= n_max) of a static token stream.

    For each n, `keys[n]` holds the hash of the n tokens before every position whose context
    has no separator, sorted, and `follow[n]` those positions in the same order; a lookup is a
    binary search, and a hit is checked token by token (a hash collision proposes nothing).
    """

    def __init__(self, tokens: np.ndarray, n_max: int) -> None:
        self.tokens = np.asarray(tokens, dtype=np.int64)
        self.n_max = n_max
        self.keys: list[np.ndarray] = [np.empty(0, np.int64)]
        self.follow: list[np.ndarray] = [np.empty(0, np.int64)]
        N = len(self.tokens)
        h = np.zeros(N + 1, dtype=np.int64)  # h[i]: hash of the n tokens before position i
        clean = np.ones(N + 1, dtype=bool)  # no separator among them
        for n in range(1, n_max + 1):
            prev = np.concatenate([np.full(n, SEPARATOR, np.int64), self.tokens])[: N + 1]  # the token at i - n
            h = _mix(h, prev)
            clean &= prev != SEPARATOR
            pos = np.nonzero(clean[:N])[0]  # something follows (positions < N)
            pos = pos[self.tokens[pos] != SEPARATOR]
            order = np.argsort(h[pos], kind="stable")
            self.keys.append(h[pos][order])
            self.follow.append(pos[order])

    def continuations(self, history: Sequence[int], depth: int, per_n: int) -> list[tuple[list[int], float]]:
        """Up to `per_n` continuations (each up to `depth` tokens, stopping at a separator) of the
        longest suffixes of `history` found in the corpus, weighted n**2 like the row's own
        n-gram matches; shorter suffixes only while fewer than `per_n` were found. Frequent
        contexts are sampled evenly across the corpus."""
        out: list[tuple[list[int], float]] = []
        for n in range(min(self.n_max, len(history)), 0, -1):
            suffix = [int(t) for t in history[len(history) - n :]]
            key = _suffix_hash(suffix)
            lo, hi = np.searchsorted(self.keys[n], key, "left"), np.searchsorted(self.keys[n], key, "right")
            if hi <= lo:
                continue
            take = min(per_n - len(out), hi - lo)
            for p in self.follow[n][lo + (np.arange(take) * (hi - lo)) // take]:
                if self.tokens[p - n : p].tolist() != suffix:
                    continue  # hash collision
                cont = self.tokens[p : p + depth].tolist()
                if SEPARATOR in cont:
                    cont = cont[: cont.index(SEPARATOR)]
                if cont:
                    out.append((cont, float(n * n)))
            if len(out) >= per_n:
                break
        return out


class Phrases:
    """A corpus of the model's own answers and what it was made for."""

    def __init__(self, tokens: torch.Tensor, config: dict) -> None:
        self.tokens, self.config = tokens, config
        self._index: dict[int, PhraseIndex] = {}

    def index(self, n_max: int) -> PhraseIndex:
        if n_max not in self._index:
            self._index[n_max] = PhraseIndex(self.tokens.numpy(), n_max)
        return self._index[n_max]

    @classmethod
    def from_answers(cls, answers: Sequence[Sequence[int]], config: dict) -> "Phrases":
        stream: list[int] = []
        for a in answers:
            stream += [int(t) for t in a] + [SEPARATOR]
        return cls(torch.tensor(stream, dtype=torch.int32), config)

    def save(self, directory: str | Path) -> None:
        from safetensors.torch import save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        save_file({"tokens": self.tokens}, str(directory / TOKENS))
        (directory / CONFIG).write_text(json.dumps(self.config, indent=1))

    @classmethod
    def load(cls, directory: str | Path, model: torch.nn.Module | None = None) -> "Phrases":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        from propd_compile.heads import identity_mismatch

        directory = Path(directory)
        if not (directory / CONFIG).exists() or not (directory / TOKENS).exists():
            raise FileNotFoundError(
                f"no phrase corpus in {directory} (expected {CONFIG} and {TOKENS}); make one with "
                "`propd build-phrases --model NAME --out DIR`"
            )
        try:
            config = json.loads((directory / CONFIG).read_text())
            tokens = load_file(str(directory / TOKENS))["tokens"]
        except (OSError, ValueError, KeyError, SafetensorError) as e:
            raise ValueError(f"the phrase corpus in {directory} is unreadable ({e}); rebuild it with `propd build-phrases`") from e
        if config.get("format") != FORMAT or config.get("version", 0) > VERSION:
            raise ValueError(f"{directory / CONFIG} is not a propd phrase corpus of version <= {VERSION}")
        if model is not None:
            why = identity_mismatch(config["base_model"], model)
            if why:
                raise ValueError(
                    f"the phrase corpus in {directory} does not fit this model: {why}. "
                    "Make one for it with `propd build-phrases --model NAME --out DIR` and pass ProPDConfig(phrases=DIR)"
                )
        vocab = model.get_output_embeddings().weight.shape[0] if model is not None else None
        if tokens.dtype != torch.int32 or tokens.dim() != 1:
            raise ValueError(f"the phrase corpus in {directory} is not a 1-D int32 token stream; rebuild it")
        if tokens.numel() and (int(tokens.min()) < SEPARATOR or (vocab is not None and int(tokens.max()) >= vocab)):
            raise ValueError(f"the phrase corpus in {directory} holds tokens outside the model's vocabulary; rebuild it")
        return cls(tokens, config)


def resolve_phrases(model: torch.nn.Module, path: str | Path | bool | None) -> Phrases | None:
    """The corpus at `path` (checked against `model`), the one shipped for `model` when `path`
    is None, nothing when it is False; kept in an accelerated model's state."""
    from propd_compile.heads import shipped_dir_for
    from propd_compile.state import built_for

    if path is False:
        return None
    if path is None:
        path = built_for(model, ("shipped phrases",), lambda: shipped_dir_for(model, SHIPPED_DIR, FORMAT))
        if path is None:
            return None
    return built_for(model, ("phrases", str(Path(path).resolve())), lambda: Phrases.load(path, model))


# --- building a corpus ---------------------------------------------------------------------------
@torch.no_grad()
def build_phrases(
    model, tokenizer, out: str | Path, settings=None, batch_size: int = 16, model_name: str | None = None
) -> Phrases:
    """The model's greedy answers to prompts it writes itself, as a corpus in `out`.

    `settings` (`train_heads.TrainSettings`; default 1200 prompts, answers of at most 256
    tokens) says how prompts are written and how long answers get. Resumable: prompts and
    answers are kept in `out/work` (answers appended per batch). The answers come from the
    model's own greedy `generate`; an accelerated model answers through propd (token-identical,
    faster).
    """
    from tqdm.auto import tqdm

    from propd_compile.distill_data import chat_ids, check_work_settings
    from propd_compile.heads import model_identity
    from propd_compile.train_heads import BenchmarkFilter, TrainSettings, _eos_pad, _left_pad, write_prompts

    out = Path(out)
    work = out / "work"
    work.mkdir(parents=True, exist_ok=True)
    settings = settings or TrainSettings(num_prompts=1200, answer_tokens=256)
    check_work_settings(work, "phrases_settings.json", asdict(settings), ("answer_tokens", "prompt_tokens", "temperature", "top_p", "seed"))
    prompts = write_prompts(model, tokenizer, settings, work, BenchmarkFilter.mt_bench())
    rows = [chat_ids(tokenizer, p)[0] for p in prompts]
    answers_path = work / "answers.jsonl"
    answers: dict[int, list[int]] = {}
    if answers_path.exists():
        for line in answers_path.read_text().splitlines():
            r = json.loads(line)
            answers[int(r["prompt_index"])] = r["answer"]
    eos, pad = _eos_pad(model)
    todo = sorted((i for i in range(len(rows)) if i not in answers), key=lambda i: len(rows[i]))  # less padding
    t0, n_tok = time.perf_counter(), 0
    bar = tqdm(total=len(rows), initial=len(rows) - len(todo), desc="answering (greedy)", unit="prompt")
    for s in range(0, len(todo), batch_size):
        idx = todo[s : s + batch_size]
        ids, mask = _left_pad([rows[i] for i in idx], pad)
        gen = model.generate(
            input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=settings.answer_tokens, pad_token_id=pad,
            eos_token_id=eos or None,
        )
        with open(answers_path, "a") as f:
            for b, i in enumerate(idx):
                a = gen[b, ids.shape[1] :].tolist()
                while a and a[-1] == pad:
                    a.pop()
                answers[i] = a
                n_tok += len(a)
                f.write(json.dumps({"prompt_index": i, "answer": a}) + "\n")
        bar.update(len(idx))
        bar.set_postfix(tok_s=f"{n_tok / (time.perf_counter() - t0):.0f}")
    bar.close()
    # each answer follows the tail of its prompt, so the corpus also predicts how answers start
    stream = [rows[i][-PROMPT_TAIL:] + answers[i] for i in range(len(rows))]
    config = {
        "format": FORMAT, "version": VERSION, "base_model": model_identity(model),
        "model_name": model_name or model_identity(model)["name"],
        "recipe": {"prompts": len(rows), "answer_tokens": settings.answer_tokens, "greedy": True, "seed": settings.seed,
                   "prompt_source": "self-written (train_heads.write_prompts), MT-Bench-close prompts dropped"},
        "tokens": int(sum(len(a) for a in stream)),
    }
    phrases = Phrases.from_answers(stream, config)
    phrases.save(out)
    return phrases
