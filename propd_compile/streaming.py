"""Hugging Face streamers on tree decoding: the same calls HF's `generate` makes, as early as possible.

HF's `generate` calls `streamer.put(input_ids)` with the prompt ([B, P]), then `put` once per
generated position with that position's token of every row ([B]; a row that already stopped
gives the padding token), then `end()`. Tree decoding makes exactly these calls, and makes each
as soon as every unfinished row has verified its token at that position. At batch 1 that is the
moment its verification step ends: every accepted token reaches the streamer then, one `put`
per token. At batch > 1 a position waits for the slowest unfinished row; HF's `TextStreamer`
and `TextIteratorStreamer` refuse batches (they raise on the prompt), as under HF's `generate`.
"""
from __future__ import annotations

from typing import Sequence

import torch


class StepStreamer:
    """Feeds `streamer` (anything with HF's `put`/`end`) from the decode loop's emitted tokens."""

    def __init__(self, streamer, input_ids: torch.Tensor, pad_token_id: int) -> None:
        self.streamer, self.pad = streamer, pad_token_id
        self.sent = 0  # generated positions already put
        streamer.put(input_ids.cpu())

    def update(self, generated: Sequence[list[int]], done: Sequence[bool]) -> None:
        """Put every position that all unfinished rows have reached."""
        open_rows = [len(g) for g, d in zip(generated, done) if not d]
        self._put_until(generated, min(open_rows) if open_rows else max(len(g) for g in generated))

    def end(self, generated: Sequence[list[int]]) -> None:
        self._put_until(generated, max(len(g) for g in generated))
        self.streamer.end()

    def _put_until(self, generated: Sequence[list[int]], n: int) -> None:
        for k in range(self.sent, n):
            self.streamer.put(torch.tensor([g[k] if k < len(g) else self.pad for g in generated]))
        self.sent = max(self.sent, n)
