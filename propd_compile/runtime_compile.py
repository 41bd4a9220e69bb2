"""Compiled verification forwards: the model exported once, propd's passes, AOTInductor.

The decode loop runs one forward shape family: B rows of T tree nodes over a KV cache of S slots
(B, T and S change every step). `build` exports that forward once with every size symbolic
(`torch.export`, sizes from 1 up, so no size-1 specialisation and no recompiles), runs the same
FX passes the `propd` torch.compile backend runs (`passes.run_passes`: attention becomes
`propd::tree_attention` reading K/V straight from the cache buffers), and compiles it with
AOTInductor for inference: weights frozen into constants, Inductor's C++ GEMM templates
autotuned per linear layer (measured against the ATen/oneDNN kernels, the faster one kept),
fused norms/RoPE/elementwise kernels, a C++ wrapper, and the cache written in place. The
result is a `.pt2` package on disk, keyed by everything it depends on (the weights' content,
the output kind, the thread count, the CPU, torch and propd's passes/kernels), so a later
process loads it in about a second instead of compiling for minutes (`propd warmup` builds it).

One package serves every step: plain one-token steps, trees of any size, any batch size, and
the prefill (`last_only`: the LM head runs on the last position only) of short prompts; on CPU,
prompts of more than EAGER_PREFILL_TOKENS real tokens prefill on eager kernels, which are
faster at hundreds of rows (`prefill_forward`). It holds one frozen copy of the weights beside
the model's own parameters: linears whose weights a block format holds exactly (Q4_1, Q8_0,
bf16: a model dequantized from GGUF, a bf16 checkpoint) in that format, read by
`propd::block_linear` (`kernels.block_linear`), the others in the GEMM templates' packed layout
(`kernels.cpp_gemm_weights`).
The cache keeps the KEPT_PACKAGES most recently used packages per model and kind.

`ProPDConfig.compile`: "auto" (default) uses the package when it is already built and eager
kernels otherwise (so a first run is not a multi-minute compile), True builds it when missing,
False is eager. Early pruning (`prune=True`) keeps the `torch.compile(backend="propd")` path:
its prune point calls an in-process predictor.

Weights: the package holds a snapshot of them. The state notices in-place changes to the
model's parameters (their version counters) and drops the forward, so stale constants are never
used: the next `generate` uses a package built for the new weights (or eager kernels).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.fx.experimental._config as fx_config

from propd_compile.cache import TreeKVCache
from propd_compile.config import ProPDConfig
from propd_compile.decoding import Forward, eager_forward
from propd_compile.ragged import RaggedStep, model_kwargs

import propd_compile.backend  # noqa: F401  (registers "propd" when the entry point is absent)

log = logging.getLogger("propd_compile.runtime_compile")

# Inductor settings of the packages: inference (frozen weights), the C++ GEMM template autotuned
# against ATen per linear shape.
INDUCTOR_OPTIONS = {"freezing": True, "max_autotune": True, "max_autotune_gemm_backends": "CPP,ATEN"}
MAX_BATCH = 256
KEPT_PACKAGES = 3  # per model and kind: packages for other weights or code than these are removed


def package_pass_options(device: str) -> dict:
    """On CPU the package keeps ATen's attention (with GQA, reading the cache slices in place):
    AOTInductor calls it in C++, while a custom op such as `propd::tree_attention` is called back
    through Python, which measured ~20% of a compiled step. On CUDA the tree-attention op
    decomposes into Triton kernels that Inductor compiles into the package."""
    return {"tree_attention": device != "cpu"}
FORMAT = 1  # bump when the package's calling convention changes


# --- the exported forward -------------------------------------------------------------------
class Verification(torch.nn.Module):
    """The forward a package holds, over flat tensors (what export traces and AOTInductor calls),
    on the packed layout of `propd_compile.ragged` (every step is packed: a dense one trivially):

    (input_ids [1, N], mask [B, 1, T, S] bool, position_ids [1, N], pack [B, T], flat [N], rows [N],
    slots [N], logit_rows [R], keys, values, keep) -> (logits [1, R, V],) or, with `hidden`,
    (logits, last hidden state [1, N, H]) and with `taps` also the features entering those layers
    ([1, N, len(taps) * H], the feature drafter's).

    keys/values are the runtime cache's per-layer buffers, node n's K/V written in place at
    (rows[n], slots[n]); logit_rows picks the packed positions whose logits are needed (all
    nodes, or each row's last prompt token in a prefill). With `hidden` the logits are the LM head
    on the base model's final hidden states (what the causal LM computes;
    `heads.check_hidden_logits` tells which models qualify)."""

    def __init__(self, model: torch.nn.Module, hidden: bool, taps: tuple[int, ...] = ()) -> None:
        super().__init__()
        self.model, self.hidden, self.taps = model, hidden, tuple(taps)

    def forward(self, input_ids, mask, position_ids, pack, flat, rows, slots, logit_rows, keys, values, keep):
        step = RaggedStep(pack, flat, rows, slots)
        cache = TreeKVCache.over(keys, values, keep, mask, step)
        args = dict(
            input_ids=input_ids, attention_mask=mask, position_ids=position_ids, cache=cache, use_cache=True,
            **model_kwargs(step),
        )
        if not self.hidden:
            return (self.model(**args, logits_to_keep=logit_rows).logits,)
        out = self.model.base_model(**args, output_hidden_states=bool(self.taps))
        h = out.last_hidden_state
        logits = self.model.get_output_embeddings()(h[:, logit_rows])
        if self.taps:
            return logits, h, torch.cat([out.hidden_states[t] for t in self.taps], -1)
        return logits, h


def _example(model: torch.nn.Module, batch: int = 2, tree: int = 8, kv: int = 64):
    """A padded tree step (sizes > 1, and fewer real nodes than B * T: export specialises sizes
    of 1 and would tie sizes that are equal in the example): (ids, mask, positions, nodes, cache)."""
    vocab = model.get_output_embeddings().out_features
    device = next(model.parameters()).device
    anc = torch.ones(tree, tree, dtype=torch.bool).tril()
    mask = torch.cat([torch.ones(batch, tree, kv - tree, dtype=torch.bool), anc.repeat(batch, 1, 1)], 2)[:, None]
    cache = TreeKVCache.for_model(model, batch, kv + 8)
    ids = torch.randint(0, vocab, (batch, tree), generator=torch.Generator().manual_seed(0))
    pos = (kv - tree + torch.arange(tree)).repeat(batch, 1)
    nodes = torch.ones(batch, tree, dtype=torch.bool)
    nodes[1:, tree // 2 :] = False
    return ids.to(device), mask.to(device), pos.to(device), nodes.to(device), cache


def _package_inputs(input_ids, mask, position_ids, step: RaggedStep, logit_rows, cache) -> list[torch.Tensor]:
    """The package's flat inputs. AOTInductor reads every input as a contiguous buffer without
    checking strides, so views (a column of the packing, an expanded mask) are made contiguous;
    the cache buffers are written in place and must be the buffers themselves."""
    steps = [step.pack_tokens(input_ids), mask, step.pack_tokens(position_ids), step.pack, step.flat, step.rows, step.slots, logit_rows]
    buffers = [*cache.keys, *cache.values, cache.keep]
    if not all(b.is_contiguous() for b in buffers):
        raise ValueError("the compiled kernels write the KV cache in place: its buffers must be contiguous")
    return [x.contiguous() for x in steps] + buffers


def _dynamic_shapes(model: torch.nn.Module, n_layers: int) -> list:
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    context = getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None) or 8192
    Dim = torch.export.Dim
    B, T = Dim("B", min=1, max=MAX_BATCH), Dim("T", min=1, max=context)
    N, R = Dim("N", min=1, max=MAX_BATCH * context), Dim("R", min=1, max=MAX_BATCH * context)
    S, L = Dim("S", min=1, max=2 * context + 64), Dim("L", min=1, max=2 * context + 64)
    return [
        {1: N}, {0: B, 2: T, 3: S}, {1: N}, {0: B, 1: T}, {0: N}, {0: N}, {0: N}, {0: R},
        [{0: B, 2: L}] * n_layers, [{0: B, 2: L}] * n_layers, {0: B, 1: L},
    ]


# --- what a package depends on ----------------------------------------------------------------
def weights_digest(model: torch.nn.Module) -> str:
    """A digest of every parameter and buffer (names, shapes, dtypes, bytes): the package's
    constants are these values, so a package is only reused for the same weights."""
    h = hashlib.blake2b(digest_size=12)
    for name, t in model.state_dict(keep_vars=True).items():
        t = t.detach()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(memoryview(t.cpu().contiguous().view(torch.uint8).reshape(-1).numpy()))
    return h.hexdigest()


def _code_digest() -> str:
    """The code the package bakes in: propd's passes and kernels, the exported forward and the
    cache's in-graph writes (not the runtime-side code around them)."""
    import inspect

    h = hashlib.blake2b(digest_size=8)
    for pkg in ("passes", "kernels"):
        mod = __import__(f"propd_compile.{pkg}", fromlist=["__file__"])
        for f in sorted(Path(mod.__file__).parent.glob("*.py")) + sorted(Path(mod.__file__).parent.glob("*.cpp")):
            h.update(f.read_bytes())
    from propd_compile import ragged

    for obj in (Verification, TreeKVCache.over, TreeKVCache.update, package_pass_options, _dynamic_shapes, ragged):
        h.update(inspect.getsource(obj).encode())
    return h.hexdigest()


@dataclass(frozen=True)
class PackageKey:
    model: str
    weights: str
    hidden: bool
    taps: tuple[int, ...]
    threads: int
    cpu: str
    torch: str
    code: str
    dtype: str
    device: str
    inductor: str  # the Inductor options, as sorted JSON
    block_linear: bool = False  # linears whose weights a block format holds exactly read that format

    @classmethod
    def of(
        cls, model: torch.nn.Module, hidden: bool, weights: str, inductor: dict | None = None, taps: tuple[int, ...] = (),
        block_linear: bool = True,
    ) -> "PackageKey":
        from propd_compile.heads import model_name

        param = next(model.parameters())
        return cls(
            model=model_name(model), weights=weights, hidden=hidden, taps=tuple(taps), threads=torch.get_num_threads(),
            cpu=torch.backends.cpu.get_cpu_capability(), torch=torch.__version__, code=_code_digest(),
            dtype=str(param.dtype).replace("torch.", ""), device=param.device.type,
            inductor=json.dumps(inductor or INDUCTOR_OPTIONS, sort_keys=True),
            block_linear=block_linear and param.device.type == "cpu",
        )

    def path(self, root: Path | None = None) -> Path:
        from propd_compile.models import cache_dir

        digest = hashlib.blake2b(json.dumps(asdict(self) | {"format": FORMAT}, sort_keys=True).encode(), digest_size=10)
        kind = ("hidden" if self.hidden else "logits") + "".join(f"-t{t}" for t in self.taps)
        name = f"{self.model}-{kind}-{self.device}{self.threads}t-{digest.hexdigest()}".replace("/", "_").replace(" ", "_")
        return (root or cache_dir() / "compiled") / f"{name}.pt2"


def manifest_path(package: Path) -> Path:
    return package.with_suffix(".json")


def _evict_stale(package: Path) -> None:
    """Keep the KEPT_PACKAGES most recently used packages of `package`'s model, kind, device and
    thread count (the name before the digest); older ones (earlier weights or propd versions, each
    the size of the weights) are removed with their manifests."""
    stem = package.stem.rsplit("-", 1)[0]
    siblings = [p for p in package.parent.glob(f"{stem}-*.pt2") if p.stem.rsplit("-", 1)[0] == stem and ".partial" not in p.name]
    siblings.sort(key=lambda p: p.stat().st_mtime, reverse=True)
    for old in siblings[KEPT_PACKAGES:]:
        if old != package:
            log.info("propd: removing the unused package %s", old.name)
            old.unlink(missing_ok=True)
            manifest_path(old).unlink(missing_ok=True)


# --- building and loading ---------------------------------------------------------------------
@torch.no_grad()
def export_verification(model: torch.nn.Module, hidden: bool, taps: tuple[int, ...] = ()) -> torch.export.ExportedProgram:
    """The verification forward (`Verification`) exported on an example step with its sizes
    dynamic: the graph a package compiles."""
    ids, mask, pos, nodes, cache = _example(model)
    step = RaggedStep.of(nodes, mask.shape[-1] - mask.shape[-2])
    flat = _package_inputs(ids, mask, pos, step, torch.arange(step.flat.numel(), device=ids.device), cache)
    n = len(cache.keys)
    example = (*flat[:8], flat[8 : 8 + n], flat[8 + n : 8 + 2 * n], cache.keep)
    module = Verification(model, hidden, taps).eval()
    return torch.export.export(module, example, dynamic_shapes=_dynamic_shapes(model, n), strict=False)


def build(model: torch.nn.Module, key: PackageKey, progress: bool = True) -> Path:
    """Export, rewrite and compile the verification forward for `key` into its package (minutes on
    a CPU); checks the package against the eager forward before keeping it."""
    from tqdm.auto import tqdm

    from propd_compile.kernels.block_linear import BlockReport, block_linears
    from propd_compile.kernels.cpp_gemm_weights import pruned_gemm_weights
    from propd_compile.kernels.tree_attention import inductor_patches
    from propd_compile.passes import run_passes

    path = key.path()
    path.parent.mkdir(parents=True, exist_ok=True)
    phases = ["export", "propd passes", "Inductor: autotune + C++ compile", "check against eager"]
    bar = tqdm(phases, desc=f"compiling {key.model}", unit="phase", disable=not progress)
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    for phase in bar:
        bar.set_postfix_str(phase)
        t = time.perf_counter()
        if phase == "export":
            with block_linears(model) if key.block_linear else contextlib.nullcontext(BlockReport()) as blocks:
                ep = export_verification(model, key.hidden, key.taps)
        elif phase == "propd passes":
            reports = [blocks, *run_passes(ep.graph_module, package_pass_options(key.device))]
            ep.graph_module.recompile()
            for r in reports:
                log.info("propd package %s: %s", path.name, r)
        elif phase.startswith("Inductor"):
            tmp = path.with_suffix(".partial.pt2")
            with inductor_patches(key.device), pruned_gemm_weights():
                torch._inductor.aoti_compile_and_package(
                    ep, package_path=str(tmp), inductor_configs=json.loads(key.inductor)
                )
        else:
            check_package(model, key.hidden, load_runner(tmp, bool(blocks.swapped)), key.taps)
            tmp.replace(path)
        timings[phase] = time.perf_counter() - t
    manifest = {
        "key": asdict(key), "format": FORMAT, "compile_seconds": time.perf_counter() - t0, "phases": timings,
        "passes": [str(r) for r in reports], "block_linears": len(blocks.swapped),
        "package_bytes": path.stat().st_size,
    }
    manifest_path(path).write_text(json.dumps(manifest, indent=1) + "\n")
    _evict_stale(path)
    from torch._dynamo.utils import counters

    counters["propd"]["packages_built"] += 1
    return path


def reads_block_weights(package: Path) -> bool:
    """Whether the package's manifest says its linears call `propd::block_linear`."""
    try:
        return bool(json.loads(manifest_path(package).read_text()).get("block_linears"))
    except (OSError, ValueError):
        return False


def load_runner(path: Path, block_linear: bool | None = None) -> Callable[[list[torch.Tensor]], list[torch.Tensor]]:
    """The package's flat calling function (AOTInductor's loader, without pytree work per call).
    `block_linear`: whether it calls `propd::block_linear` (default: what its manifest says),
    which is then loaded first."""
    if block_linear is None:
        block_linear = reads_block_weights(path)
    if block_linear:
        from propd_compile.kernels.block_linear import available

        if not available():
            raise RuntimeError(
                f"the package {path.name} calls propd::block_linear, which cannot be built here; "
                "delete it, or pass backend_options={'block_linear': False}"
            )
    loader = torch._inductor.aoti_load_package(str(path)).loader
    return loader.boxed_run


def package_forward(
    model: torch.nn.Module, run: Callable, hidden: bool, taps: tuple[int, ...] = (), block_linear: bool = False
) -> Forward:
    """The decode loop's Forward over a package's runner: logits, or with `hidden` (logits,
    hidden), with `taps` (logits, hidden, features), in the padded [B, T] layout. The package of a
    feature drafter's taps serves every kind; a hidden package serves logits and (logits, hidden).
    `block_linear`: the package's linears read block-format weights (`forward.block_linear`)."""
    device = next(model.parameters()).device

    def forward(input_ids, mask, position_ids, cache, last_only: bool = False):
        B, T = input_ids.shape
        if B > MAX_BATCH:
            raise ValueError(f"the compiled kernels take up to {MAX_BATCH} rows per step, not {B}; split the batch")
        step = cache.ragged or RaggedStep.of(torch.ones(B, T, dtype=torch.bool, device=device), mask.shape[-1] - T)
        if step.flat.numel() == 0:  # the kernels' sizes start at 1 (and would fault on 0)
            raise ValueError("a verification step needs at least one real node; this one has none")
        rows = step.pack[:, -1] if last_only else torch.arange(step.flat.numel(), device=device)
        out = run(_package_inputs(input_ids, mask, position_ids, step, rows, cache))
        logits = out[0].view(B, 1, -1) if last_only else step.unpack(out[0], (B, T))
        rest = [step.unpack(x, (B, T)) for x in out[1 : 1 + bool(hidden or taps) + bool(taps)]]
        return (logits, *rest) if hidden or taps else logits

    forward.block_linear = block_linear
    return forward


# Prefills of more real tokens than this run eager on CPU: there MKL's GEMMs beat the package's
# (autotuned for decode-sized steps) on long prompts. One prompt, 2 threads, package vs eager
# (examples/prefill_kernels.py): 32 tokens 122 vs 162 ms, 64 206 vs 201, 96 267 vs 257, 128 393
# vs 294, 512 1699 vs 1149; 8 MT-Bench prompts packed (628 real tokens) 2.2 vs 1.6 s.
EAGER_PREFILL_TOKENS = 80
# A package whose linears read block-format weights is faster than eager up to a few hundred
# tokens; where eager's MKL has AVX-512 GEMMs it wins beyond that. Package vs eager, one prompt:
# an AVX2 CPU (AMD EPYC): 32 tokens 88 vs 219 ms, 128 262 vs 470, 512 1168 vs 1249; an AVX-512
# CPU (Intel Xeon): 32 34 vs 74, 128 134 vs 146, 256 272 vs 247, 512 580 vs 455.
BLOCK_EAGER_PREFILL_TOKENS = 256


def prefill_forward(model: torch.nn.Module, compiled: Forward, hidden: bool, taps: tuple[int, ...] = ()) -> Forward:
    """The prefill's forward beside a compiled one: the package for short prompts, eager kernels
    on CPU for prompts of more than EAGER_PREFILL_TOKENS real tokens (BLOCK_EAGER_PREFILL_TOKENS
    for a package of block-format linears)."""
    if next(model.parameters()).device.type != "cpu":
        return compiled
    eager = eager_forward(model, hidden=hidden, taps=taps)

    def forward(input_ids, mask, position_ids, cache, last_only: bool = False):
        tokens = cache.ragged.flat.numel() if cache.ragged is not None else input_ids.numel()
        limit = BLOCK_EAGER_PREFILL_TOKENS if getattr(compiled, "block_linear", False) else EAGER_PREFILL_TOKENS
        return (eager if tokens > limit else compiled)(input_ids, mask, position_ids, cache, last_only)

    return forward


@torch.no_grad()
def check_package(
    model: torch.nn.Module, hidden: bool, run: Callable, taps: tuple[int, ...] = (), tolerance: float = 5e-3
) -> None:
    """Raise unless the package computes the eager forward on tree steps, ragged steps, one-token
    steps, batch 1 and the prefill's last-position logits: every output (logits, hidden states, the KV written) within `tolerance` of its
    largest magnitude (fp32 rounding in another summation order), and the same argmax."""
    eager = eager_forward(model, hidden=hidden, taps=taps)
    forward = package_forward(model, run, hidden, taps)

    def close(got: torch.Tensor, ref: torch.Tensor) -> bool:
        return got.shape == ref.shape and bool((got - ref).abs().max() <= tolerance * ref.abs().max() + 1e-6)

    cases = ((2, 5, False, False), (1, 1, False, False), (3, 1, False, False), (1, 7, False, False),
             (3, 6, True, False), (3, 6, False, True))
    for b, t, ragged, last_only in cases:
        ids, mask, pos, nodes, example_cache = _example(model, b, t, kv=t + 11)
        caches = [TreeKVCache.for_model(model, b, example_cache.max_len) for _ in range(2)]
        g = torch.Generator().manual_seed(b * 31 + t)
        for mine, twin in zip(caches[0].keys + caches[0].values, caches[1].keys + caches[1].values):
            mine.normal_(generator=g)
            twin.copy_(mine)
        for c in caches:
            c.begin_step(mask, nodes if ragged else None)
        got, ref = forward(ids, mask, pos, caches[0], last_only), eager(ids, mask, pos, caches[1], last_only)
        got, ref = (got if hidden or taps else (got,)), (ref if hidden or taps else (ref,))
        written = zip(caches[0].keys + caches[0].values, caches[1].keys + caches[1].values)
        if not all(close(x, y) for x, y in (*zip(got, ref), *written)):
            raise RuntimeError(f"the compiled package disagrees with the eager forward at batch {b}, {t} tokens; not using it")
        if not torch.equal(got[0].argmax(-1), ref[0].argmax(-1)):
            raise RuntimeError(f"the compiled package changes the argmax at batch {b}, {t} tokens; not using it")


# --- what the state asks for ------------------------------------------------------------------
def wants_hidden_package(model: torch.nn.Module) -> bool:
    """One package per model serves both output kinds when the logits are the LM head on the
    final hidden states (the heads' condition); other models get a logits-only package."""
    from propd_compile.heads import check_hidden_logits
    from propd_compile.state import built_for

    def check() -> bool:
        try:
            check_hidden_logits(model)
            return True
        except NotImplementedError:
            return False

    return built_for(model, ("hidden logits",), check)


def package_key(model: torch.nn.Module, config: ProPDConfig, taps: tuple[int, ...] = ()) -> PackageKey:
    """The package for the model's current weights (their digest is kept per weights version),
    the Inductor options of `config.backend_options["inductor_config"]` (default: INDUCTOR_OPTIONS)
    and `taps`, else the taps of the model's feature drafter for `config` if it has one: one
    package then serves every drafter and plain steps."""
    from propd_compile.state import built_for

    weights = built_for(model, ("weights digest", weights_version(model)), lambda: weights_digest(model))
    inductor = config.backend_options.get("inductor_config") or INDUCTOR_OPTIONS
    hidden = wants_hidden_package(model)
    taps = tuple(taps) or (_drafter_taps(model, config) if hidden else ())
    return PackageKey.of(model, hidden, weights, dict(inductor), taps, config.backend_options.get("block_linear", True))


def _drafter_taps(model: torch.nn.Module, config: ProPDConfig) -> tuple[int, ...]:
    from propd_compile.feature_drafter import resolve_drafter

    try:
        draft = resolve_drafter(model, config.drafter)
    except (ValueError, FileNotFoundError, NotImplementedError):
        return ()
    return tuple(draft.taps) if draft is not None else ()


def weights_version(model: torch.nn.Module) -> tuple:
    """Changes when any parameter or buffer is modified in place or replaced."""
    return tuple((t.data_ptr(), t._version) for t in model.state_dict(keep_vars=True).values())


def compiled_forward(
    model: torch.nn.Module, config: ProPDConfig, hidden: bool = False, taps: tuple[int, ...] = ()
) -> Forward | None:
    """The compiled verification forward for `config` (`config.compile` True or "auto"), or None
    when "auto" finds no package built for this model, machine and thread count."""
    if config.prune:
        return dynamo_forward(model, hidden, backend_options_for(model, config), taps)
    key = package_key(model, config, taps)
    if (hidden or taps) and not key.hidden:
        raise NotImplementedError("this model's logits are not its LM head on the final hidden states; use drafters=('ngram',)")
    path = key.path()
    if not path.exists():
        if config.compile != True:  # noqa: E712  ("auto")
            return None
        log.warning("propd: compiling the verification kernels for %s (a few minutes, once per machine)", key.model)
        build(model, key)
    with contextlib.suppress(OSError):
        path.touch()  # most recently used: kept when newer packages of this model are built
    block = reads_block_weights(path)
    return package_forward(model, load_runner(path, block), hidden, taps, block)


def warm(model: torch.nn.Module, config: ProPDConfig) -> bool:
    """Whether a compiled package is ready for `model` and `config` here (what compile="auto" uses)."""
    return package_key(model, config).path().exists()


# --- the torch.compile path (early pruning) ---------------------------------------------------
def backend_options_for(model: torch.nn.Module, config: ProPDConfig) -> dict:
    """The propd backend's options for `config`: its `backend_options`, plus the resolved early
    predictor when `config.prune`."""
    options = dict(config.backend_options)
    if config.prune:
        from propd_compile.early_head import prune_options

        options["prune"] = prune_options(model, config)
    return options


def dynamo_forward(
    model: torch.nn.Module, hidden: bool = False, options: dict | None = None, taps: tuple[int, ...] = ()
) -> Forward:
    """`decoding.eager_forward(model, hidden, taps)` through `torch.compile(backend="propd", dynamic=True)`
    with the packages' Inductor settings (frozen weights: freezing is decided when Dynamo traces,
    so each call runs with it on; grad is off in decoding).

    Dynamo specialises sizes 1, so decoding compiles a few graphs while it warms up ({one row,
    several} x {root-only step, tree}: see `warm_up`) and then none."""
    options = dict(options or {})
    inductor = dict(options.get("inductor_config") or INDUCTOR_OPTIONS)
    options["inductor_config"] = inductor
    compiled = torch.compile(eager_forward(model, hidden=hidden, taps=taps), backend="propd", dynamic=True, options=options)

    def forward(input_ids, mask, position_ids, cache, last_only: bool = False):
        if last_only:
            raise ValueError("the torch.compile verification forward does not run prefills")
        # No duck sizing: two sizes that happen to be equal at compile time (batch and tree size,
        # say) must not be fused into one symbol, or the first step where they differ recompiles.
        with fx_config.patch(use_duck_shape=False), torch._inductor.config.patch(freezing=inductor.get("freezing", False)):
            return compiled(input_ids, mask, position_ids, cache)

    return forward


@torch.no_grad()
def warm_up(model: torch.nn.Module, config: ProPDConfig, batch_sizes: tuple[int, ...] = (1, 2)) -> None:
    """Make every forward decoding can need ready before decoding starts: load (or, with
    compile=True, build) the package; on the torch.compile path compile each graph Dynamo
    specialises (one row or several, times root-only steps or trees)."""
    from propd_compile.drafters import build_drafter
    from propd_compile.state import state_of

    state = state_of(model)
    if state is None:
        raise ValueError("warm_up compiles an accelerated model's forwards: call propd_compile.accelerate(model, config) first")
    drafter = build_drafter(config, model)
    forward = state.forward(config, hidden=drafter.needs_hidden, taps=drafter.feature_layers)
    if not config.prune:
        return
    device = next(model.parameters()).device
    prefix = 5
    for b in batch_sizes:
        for T in (1, 3):
            cache = TreeKVCache.for_model(model, b, prefix + T + 4)
            cache.lengths = [prefix] * b
            tree = torch.ones(T, T, dtype=torch.bool).tril()
            mask = torch.cat([torch.ones(b, T, prefix, dtype=torch.bool), tree.repeat(b, 1, 1)], 2)[:, None]
            positions = (prefix + torch.arange(T)).repeat(b, 1)
            cache.begin_step(mask.to(device))
            forward(torch.zeros(b, T, dtype=torch.long, device=device), mask.to(device), positions.to(device), cache)
            cache.end_step()
