"""How long a verification step takes: ProPD's weighted-regression latency estimator.

A step verifies B rows of T tree nodes each over a KV cache of length KV. On these machines the
time is close to linear in a handful of features, with step changes: one token (B T = 1) runs
matrix-vector kernels, more tokens matrix-matrix ones (../shared/research/measurements.md: 2
tokens cost 1.6x one, 32 tokens 2x), and a tree (T > 1) takes the model's multi-query attention
path. With pruning, the deep layers see only the survivors, so the tokens before and after
pruning are separate features. A ragged step (rows of their own sizes, `propd_compile.ragged`)
runs its linear layers on the N real nodes only, while attention still sees each row padded to
the largest tree T, so N and B T are separate features too (N = B T on a padded step). The
linear layers' cost per token is not one slope: on the project's CPUs the first few rows of a
GEMM ride along with the weights' read (a 4-node step costs ~1.2x a plain one) and later rows
cost their arithmetic (~2 ms per row past 4 at batch 1 on a Zen 4 core pair), so N enters
piecewise linearly, with knots at 4, 8 and 16 tokens. One slope fit over the whole calibration
grid (up to 512 tokens) predicted a 2-node step at half a plain step's time, and the planner
chose trees by it:

    t ~ b0 + b1 [N > 1] + b2 [T > 1] + b3 B + b4 N + b5 B T_kept + b6 B KV + b7 B T KV
        + b8 (N - 4)+ + b9 (N - 8)+ + b10 (N - 16)+

The fit is least squares with recency weights exp(-age / half_life * ln 2) (ProPD weights stale
measurements less), a small ridge term so collinear features (T_kept = T without pruning) stay
solvable, and non-negative predictions. It is refit online from every measured step, and
`propd calibrate` measures this machine offline (`calibrate`), reports the error on held-out
steps and saves the fit, which warm-starts decoding. A loaded fit stays the prior of the online
refits (the ridge term pulls toward it, not toward zero): decoding mostly measures the shapes it
runs, often plain steps only, and those alone would let the refit say anything about trees.
"""
from __future__ import annotations

import json
import logging
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

log = logging.getLogger(__name__)

FEATURES = ("1", "N>1", "T>1", "B", "N", "B*T_kept", "B*KV/1k", "B*T*KV/1k", "(N-4)+", "(N-8)+", "(N-16)+")
KNOTS = (4, 8, 16)  # tokens where the per-token slope may change


def features(batch: int, tree: int, kept: float, kv: int, tokens: int | None = None) -> list[float]:
    """The regression features of a step: B rows padded to T nodes, `kept` of them past pruning,
    `tokens` real nodes in all (B T unless the step is ragged)."""
    n = batch * tree if tokens is None else tokens
    return feature_matrix(batch, np.array([tree]), np.array([kept]), kv, np.array([n]))[0].tolist()


def feature_matrix(batch: int, tree: np.ndarray, kept: np.ndarray, kv: int, tokens: np.ndarray) -> np.ndarray:
    """`features` of many candidate steps at once (one row each; tree, kept, tokens 1-D).
    NumPy, not torch: a planner prices a few dozen candidates per step, where torch's per-op
    dispatch would cost more than the arithmetic."""
    tree, kept, tokens = (np.asarray(x, dtype=np.float64) for x in (tree, kept, tokens))
    one = np.ones_like(tree)
    return np.stack([
        one, (tokens > 1).astype(np.float64), (tree > 1).astype(np.float64), batch * one, tokens, batch * kept,
        batch * kv / 1e3 * one, batch * kv / 1e3 * tree, *(np.maximum(tokens - k, 0.0) for k in KNOTS),
    ], 1)


@dataclass
class LatencyModel:
    """Online recency-weighted least squares of step seconds on `features`.

    Observations are kept as their weighted sufficient statistics (sum of w x x^T, of w x y, of
    w; every observation ages all earlier ones by one step), so observing costs the same after
    a million steps as after ten, and a refit is one small solve: decoding observes every step."""

    half_life: float = 256.0  # steps
    ridge: float = 1e-6
    refit_every: int = 16
    coef: list[float] | None = None
    # coefficients the refits shrink toward (a loaded calibration), with the weight of this many steps
    prior: list[float] | None = None
    prior_weight: float = 8.0
    max_batch: int | None = None  # the largest batch size a loaded calibration measured (beyond: extrapolation)
    # the statistics, sized by the first observation (the planner also fits models of 2 features)
    _xx: np.ndarray | None = field(default=None, repr=False)
    _xy: np.ndarray | None = field(default=None, repr=False)
    _w: float = 0.0  # the summed weights of all observations
    _scale: np.ndarray | None = field(default=None, repr=False)  # max |x| seen per feature
    _since_fit: int = 0

    def observe(self, x: Sequence[float], seconds: float) -> None:
        x = np.asarray(x, dtype=np.float64)
        if self._xx is None:
            self._xx, self._xy, self._scale = np.zeros((len(x), len(x))), np.zeros(len(x)), np.zeros(len(x))
        age = 0.5 ** (1.0 / self.half_life)  # the weight an observation keeps per later one
        self._xx *= age
        self._xx += np.outer(x, x)
        self._xy *= age
        self._xy += x * float(seconds)
        self._w = self._w * age + 1.0
        np.maximum(self._scale, np.abs(x), out=self._scale)
        self._since_fit += 1
        if self.coef is None or self._since_fit >= self.refit_every:
            self.fit()

    def fit(self) -> None:
        """Refit on what was observed, newest weighted most; keeps the old fit if there is no data."""
        if self._w <= 0:
            return
        scale = np.maximum(self._scale, 1e-12)  # features on one scale, so one ridge fits all
        A = self._xx / np.outer(scale, scale) + self.ridge * self._w * np.eye(len(scale))
        b = self._xy / scale
        if self.prior is not None:  # shrink toward the prior where the data say little
            A = A + self.prior_weight * np.eye(len(scale))
            b = b + self.prior_weight * np.asarray(self.prior, dtype=np.float64) * scale
        self.coef = (np.linalg.solve(A, b) / scale).tolist()
        self._since_fit = 0

    @property
    def ready(self) -> bool:
        return self.coef is not None

    def predict(self, x: Sequence[float]) -> float:
        return float(self.predict_many(np.asarray([x], dtype=np.float64))[0])

    def predict_many(self, X: np.ndarray) -> np.ndarray:
        """Predicted seconds of each row of features X (non-negative)."""
        if self.coef is None:
            raise RuntimeError("LatencyModel.predict before any step was observed or a calibration loaded")
        return np.maximum(np.asarray(X, dtype=np.float64) @ np.asarray(self.coef), 1e-6)

    def mape(self, points: Sequence[tuple[Sequence[float], float]]) -> float:
        """Mean absolute percentage error of the predictions on (features, seconds) pairs."""
        return sum(abs(self.predict(x) - t) / t for x, t in points) / max(len(points), 1)

    # --- persistence ------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {"features": list(FEATURES), "coef": self.coef, "half_life": self.half_life, "ridge": self.ridge}

    @classmethod
    def from_dict(cls, d: dict) -> "LatencyModel":
        if d.get("features") != list(FEATURES):
            raise ValueError(f"latency fit has features {d.get('features')}, this propd uses {list(FEATURES)}; rerun `propd calibrate`")
        return cls(half_life=d["half_life"], ridge=d["ridge"], coef=d["coef"], prior=list(d["coef"]))


def calibration_path(model: torch.nn.Module, compiled: bool = False, root: Path | None = None) -> Path:
    """Where `propd calibrate` keeps the fit for this model, forward (eager or compiled),
    device and thread count."""
    from propd_compile.heads import model_identity
    from propd_compile.models import cache_dir

    ident = model_identity(model)
    device = next(model.parameters()).device
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu{torch.get_num_threads()}t"
    kind = "compiled" if compiled else "eager"
    name = f"{ident['name']}-{ident['config_hash']}-{where}-{next(model.parameters()).dtype}-{kind}"
    name = name.replace(" ", "_").replace("/", "_")
    return (root or cache_dir() / "calibration") / f"{name}.json"


def load_calibration(model: torch.nn.Module, compiled: bool = False) -> LatencyModel | None:
    """This machine's saved fit, or None (none saved, or saved by a propd with other features:
    decoding then measures its own, and says how to refresh the file)."""
    path = calibration_path(model, compiled)
    if not path.exists():
        return None
    try:
        report, kernels = json.loads(path.read_text()), kernels_id()
        if report.get("kernels") != kernels:
            log.warning("ignoring the latency calibration %s: it measured other kernels (%s, now %s); "
                        "`propd warmup` (compiled) or `propd calibrate` refreshes it", path, report.get("kernels"), kernels)
            return None
        fit = LatencyModel.from_dict(report["fit"])
        fit.max_batch = max((p["batch"] for p in report.get("points", [])), default=None)
        return fit
    except (ValueError, KeyError, TypeError) as e:  # JSONDecodeError is a ValueError
        log.warning("ignoring the latency calibration %s (%s); measuring steps online instead", path, e)
        return None


@torch.no_grad()
def measure_step(
    model: torch.nn.Module, forward, batch: int, tree: int, kv: int, repeats: int = 1, rng: random.Random | None = None,
    sizes: Sequence[int] | None = None,
) -> float:
    """Seconds of one verification forward (median of `repeats`) for a random tree shape; with
    `sizes`, a ragged step in which row b verifies only its first sizes[b] nodes."""
    rng = rng or random.Random(0)
    from propd_compile.cache import TreeKVCache

    device = next(model.parameters()).device
    vocab = model.get_output_embeddings().weight.shape[0]
    parents = [-1] + [rng.randrange(i) for i in range(1, tree)]
    anc = torch.eye(tree, dtype=torch.bool)
    for i in range(1, tree):
        anc[i] |= anc[parents[i]]
    depth = anc.sum(1) - 1
    mask = torch.cat([torch.ones(batch, tree, kv, dtype=torch.bool), anc.repeat(batch, 1, 1)], 2)[:, None].to(device)
    ids = torch.randint(0, vocab, (batch, tree), device=device)
    pos = (kv + depth).repeat(batch, 1).to(device)
    # spare slots, as in decoding: a cache exactly as long as the mask would take another graph
    cache = TreeKVCache.for_model(model, batch, kv + tree + 8)
    cache.lengths = [kv] * batch
    nodes = None if sizes is None else (torch.arange(tree)[None] < torch.tensor(list(sizes))[:, None]).to(device)
    times = []
    for _ in range(repeats):
        cache.begin_step(mask, nodes)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        forward(ids, mask, pos, cache)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t0)
        cache.end_step()
    return sorted(times)[len(times) // 2]


def calibrate(
    model: torch.nn.Module,
    forward,
    batch_sizes: Sequence[int] = (1, 2, 4, 8),
    tree_sizes: Sequence[int] = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64),
    kv_lengths: Sequence[int] = (64, 256, 512),
    repeats: int = 3,
    holdout: float = 0.25,
    seed: int = 0,
    progress: bool = True,
) -> dict:
    """Measure steps over a grid of (B, T, KV), padded and, on a model that takes ragged steps
    (accelerated), ragged with random row sizes (B > 1, at the middle KV); fit on a random
    1 - `holdout` of them and report the mean absolute percentage error on the rest; the saved
    fit then uses all points."""
    from tqdm.auto import tqdm

    from propd_compile.ragged import takes_ragged_steps

    rng = random.Random(seed)
    mid_kv = sorted(kv_lengths)[len(kv_lengths) // 2]
    grid = [(b, t, kv, None) for b in batch_sizes for t in tree_sizes for kv in kv_lengths]
    if takes_ragged_steps(model):
        grid += [(b, t, mid_kv, (t, *(rng.randint(1, t) for _ in range(b - 1))))
                 for b in batch_sizes if b > 1 for t in tree_sizes if t > 1]
    rng.shuffle(grid)
    # one-token shapes (B = T = 1) are a regime of their own: keep them all in the fit, so the
    # held-out shapes never test a regime the fit has not seen
    grid.sort(key=lambda g: g[0] * g[1] == 1)
    measure_step(model, forward, 1, 2, 16)  # first-call costs (allocations, lazy init) out of the data
    points = []
    for b, t, kv, sizes in tqdm(grid, desc="calibrating step latency", unit="shape", disable=not progress):
        x = features(b, t, t, kv, tokens=sum(sizes) if sizes else None)
        points.append((x, measure_step(model, forward, b, t, kv, repeats, rng, sizes), (b, t, kv, sizes)))
    n_hold = max(1, round(len(points) * holdout))
    held, train = points[:n_hold], points[n_hold:]
    fit = LatencyModel(half_life=float("inf"))
    for x, s, _ in train:
        fit.observe(x, s)
    fit.fit()
    mape = fit.mape([(x, s) for x, s, _ in held])
    full = LatencyModel(half_life=float("inf"))
    for x, s, _ in points:
        full.observe(x, s)
    full.fit()
    full.half_life = LatencyModel.half_life
    return {
        "fit": full.to_dict(),
        "held_out_mape": mape,
        "held_out_points": n_hold,
        "points": [{"batch": g[0], "tree": g[1], "kv": g[2], "sizes": g[3], "seconds": s,
                    "predicted_held_out_fit": fit.predict(x)} for x, s, g in points],
        "threads": torch.get_num_threads(),
        "device": str(next(model.parameters()).device),
    }


def kernels_id() -> str:
    """What a calibration measured besides the model and machine: torch and the code propd
    compiles into its kernels and runs in attention (a fit of other kernels misleads the planner)."""
    from propd_compile.runtime_compile import _code_digest

    return f"torch {torch.__version__}, propd kernels {_code_digest()}"


def save_calibration(model: torch.nn.Module, report: dict, compiled: bool = False, path: Path | None = None) -> Path:
    report = {**report, "kernels": kernels_id()}
    path = path or calibration_path(model, compiled)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=1) + "\n")
    return path
