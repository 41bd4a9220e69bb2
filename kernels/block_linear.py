"""`propd::block_linear`: linear layers that read fewer bytes per step without changing a weight.

A one-token decode step on CPU reads every weight once, so its time is the weights' bytes over
the memory bandwidth. Many fp32 models hold weights that a narrower format represents exactly:
a model dequantized from GGUF (SmolLM2's embedded copy is Q4_1 blocks, its tied embedding
Q8_0), or a bf16 checkpoint loaded as fp32. `block_weight(W)` finds such a format, proves it
(every rebuilt weight bit-equal to W) and packs W for the C++ kernel in `block_linear.cpp`, which
rebuilds each weight to its exact fp32 value in registers and multiplies in fp32: the same GEMM
with the same weights, only summed in another order (as any two GEMM kernels do), at 0.625
(Q4_1), 1.06 (Q8_0) or 2 (bf16) bytes per weight instead of 4.

`block_linears(model)` swaps, for the duration of an export, every `nn.Linear` whose weight packs
for a `BlockLinear` over the packed tensors (the compiled package then holds only those), and
logs each linear it leaves alone with the reason. The kernel needs x86 AVX2 + FMA + F16C and a
C++ compiler (the one Inductor uses); it is built once per machine into torch's extension cache.
"""
from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

log = logging.getLogger("propd_compile.kernels.block_linear")

TILE = 16  # outputs per tile of the packed layout
BLOCK = 32  # weights per scale block along the input features
FORMATS = ("q4_1", "q8_0", "bf16")  # narrowest first
_SOURCE = Path(__file__).with_name("block_linear.cpp")
_loaded: bool | str | None = None  # True, or why the kernel is unavailable


def available() -> bool:
    """Build (once per machine, ~1 minute) and load the kernel; False, logged once with the
    reason, where this CPU or toolchain cannot run it."""
    global _loaded
    if _loaded is None:
        _loaded = _load()
        if _loaded is not True:
            log.warning("propd: block-format linear kernel unavailable (%s); linears stay fp32", _loaded)
    return _loaded is True


def ready() -> bool:
    """`available()`, without building: True where the kernel is loaded or was built on this
    machine before (loading it then takes well under a second)."""
    if _loaded is None:
        from torch.utils.cpp_extension import _get_build_directory

        if not (Path(_get_build_directory("propd_block_linear", False)) / "propd_block_linear.so").exists():
            return False
    return available()


def _load() -> bool | str:
    if torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):
        return f"needs AVX2, this CPU reports {torch.backends.cpu.get_cpu_capability()}"
    from torch.utils.cpp_extension import load

    t = time.perf_counter()
    try:
        load(
            name="propd_block_linear", sources=[str(_SOURCE)], is_python_module=False, verbose=False,
            extra_cflags=["-O3", "-mavx2", "-mfma", "-mf16c", "-fopenmp"], extra_ldflags=["-fopenmp"],
        )
    except Exception as e:  # no compiler, or a build failure: keep fp32 linears
        return f"building {_SOURCE.name} failed: {str(e).splitlines()[0] if str(e) else type(e).__name__}"
    log.info("propd: block-format linear kernel ready in %.1f s", time.perf_counter() - t)
    torch.library.register_fake("propd::block_linear")(_fake)
    return True


def _fake(x: torch.Tensor, q: torch.Tensor, d: torch.Tensor, m: torch.Tensor | None) -> torch.Tensor:
    return x.new_empty((*x.shape[:-1], q.shape[0] * TILE))


@dataclass
class BlockWeight:
    """A weight [N, K] in a block format: `q` [N/16, K, 16 weights] (Q4_1: 8 bytes of nibbles),
    fp16 scales `d` and offsets `m` [N/16, K/32, 16] (bf16: neither)."""

    format: str
    q: torch.Tensor
    d: torch.Tensor
    m: torch.Tensor | None

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.q, self.d, self.m) if t is not None)


def _tiles(t: torch.Tensor) -> torch.Tensor:
    """[N, C] -> [N/16, C, 16], contiguous."""
    return t.reshape(-1, TILE, t.shape[1]).transpose(1, 2).contiguous()


def _q4_1(w: torch.Tensor) -> BlockWeight | None:
    """w = d * q + m per block of 32, q in 0..15, d and m fp16 (GGUF Q4_1): m is the block's
    minimum and d its range over 15 (or 14, 16, 13 where fp16 rounding moved the top level)."""
    b = w.reshape(w.shape[0], -1, BLOCK)
    lo, hi = b.amin(-1, keepdim=True), b.amax(-1, keepdim=True)
    if not torch.equal(lo.half().float(), lo):
        return None
    d_best = torch.zeros_like(lo)
    q_best = torch.zeros_like(b)
    done = torch.zeros(lo.shape, dtype=torch.bool)
    for levels in (15, 14, 16, 13):
        d = ((hi - lo) / levels).half().float()
        q = torch.where(d > 0, (b - lo) / torch.where(d > 0, d, 1), 0).round().clamp(0, 15)
        exact = ((d * q + lo) == b).all(-1, keepdim=True) & ~done
        d_best = torch.where(exact, d, d_best)
        q_best = torch.where(exact, q, q_best)
        done |= exact
    if not bool(done.all()):
        return None
    q = _tiles(q_best.reshape(w.shape).to(torch.uint8))
    packed = (q[..., :8] | (q[..., 8:] << 4)).contiguous()
    return BlockWeight("q4_1", packed, _tiles(d_best.squeeze(-1).half()), _tiles(lo.squeeze(-1).half()))


def _q8_0(w: torch.Tensor, exact: bool = True) -> BlockWeight | None:
    """w = d * q per block of 32, q in -127..127, d fp16 (GGUF Q8_0): d is the block's largest
    magnitude over 127. With `exact=False`, the Q8_0 weight nearest to w."""
    b = w.reshape(w.shape[0], -1, BLOCK)
    d = (b.abs().amax(-1, keepdim=True) / 127).half().float()
    q = torch.where(d > 0, b / torch.where(d > 0, d, 1), 0).round().clamp(-127, 127)
    if exact and not torch.equal(d * q, b):
        return None
    return BlockWeight("q8_0", _tiles(q.reshape(w.shape).to(torch.int8)), _tiles(d.squeeze(-1).half()), None)


def nearest_q8_0(w: torch.Tensor) -> BlockWeight:
    """The Q8_0 weight nearest to `w` ([N, K] fp32, N a multiple of 16, K of 32), for weights
    whose exact values do not matter, such as a drafter's: its drafts only change how many of
    them verification accepts. A weight that is Q8_0 already comes back exact."""
    if w.dtype != torch.float32 or w.dim() != 2 or w.shape[0] % TILE or w.shape[1] % BLOCK:
        raise ValueError(f"nearest_q8_0 needs a 2-D fp32 weight [16n, 32k], got {w.dtype} {tuple(w.shape)}")
    return _q8_0(w.detach().cpu(), exact=False)


def _bf16(w: torch.Tensor) -> BlockWeight | None:
    h = w.bfloat16()
    if not torch.equal(h.float(), w):
        return None
    return BlockWeight("bf16", _tiles(h.view(torch.int16)), torch.empty(0, dtype=torch.half), None)


def block_weight(w: torch.Tensor) -> tuple[BlockWeight | None, str]:
    """The narrowest block format that holds `w` ([N, K] fp32) exactly, or None and why not."""
    if w.dtype != torch.float32 or w.dim() != 2 or w.device.type != "cpu":
        return None, f"weight is {w.dtype} {tuple(w.shape)} on {w.device.type}, not a 2-D fp32 CPU tensor"
    if w.shape[0] % TILE or w.shape[1] % BLOCK:
        return None, f"shape {tuple(w.shape)}: outputs must be a multiple of {TILE} and inputs of {BLOCK}"
    w = w.detach()
    for fmt in (_q4_1, _q8_0, _bf16):
        packed = fmt(w)
        if packed is not None:
            return packed, ""
    return None, "no block format (Q4_1, Q8_0, bf16) represents every weight exactly"


def rebuild(bw: BlockWeight) -> torch.Tensor:
    """The fp32 weight [N, K] a packed weight stands for (what the kernel multiplies by)."""

    def untile(t: torch.Tensor) -> torch.Tensor:  # [N/16, C, 16] -> [N, C]
        return t.transpose(1, 2).reshape(-1, t.shape[1])

    def per_weight(scales: torch.Tensor) -> torch.Tensor:
        return untile(scales.float()).repeat_interleave(BLOCK, dim=1)

    if bw.format == "bf16":
        return untile(bw.q.view(torch.bfloat16).float())
    if bw.format == "q8_0":
        return untile(bw.q.float()) * per_weight(bw.d)
    q = torch.cat([bw.q & 15, bw.q >> 4], dim=-1).float()
    return untile(q) * per_weight(bw.d) + per_weight(bw.m)


def isa() -> str:
    """The instruction set the kernel runs on: "avx512" where the CPU has AVX-512 F/BW/VL
    (twice the fp32 multiply-adds per instruction and registers for 16 rows per pass), else
    "avx2"; PROPD_BLOCK_ISA=avx2 in the environment keeps AVX2 (`available()` must be True)."""
    return torch.ops.propd.block_linear_isa()


def isas() -> tuple[str, ...]:
    """Every instruction set this CPU can run the kernel on."""
    with contextlib.suppress(RuntimeError), use_isa("avx512"):
        return ("avx2", "avx512")
    return ("avx2",)


@contextlib.contextmanager
def use_isa(name: str) -> Iterator[None]:
    """Run the kernel on `name` within the block (both give the fp32 product, in different
    summation orders); RuntimeError naming the reason where this CPU cannot."""
    before = isa()
    torch.ops.propd.block_linear_isa(name)
    try:
        yield
    finally:
        torch.ops.propd.block_linear_isa(before)


def block_linear(x: torch.Tensor, bw: BlockWeight) -> torch.Tensor:
    """x @ W^T through the kernel (`available()` must be True)."""
    return torch.ops.propd.block_linear(x, bw.q, bw.d, bw.m)


class BlockLinear(nn.Module):
    """A bias-free linear layer over a packed weight; its buffers are what a package keeps."""

    def __init__(self, bw: BlockWeight) -> None:
        super().__init__()
        self.format = bw.format
        self.out_features, self.in_features = bw.q.shape[0] * TILE, bw.q.shape[1]
        self.register_buffer("q", bw.q)
        self.register_buffer("d", bw.d)
        self.register_buffer("m", bw.m)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.propd.block_linear(x, self.q, self.d, self.m)


@dataclass
class BlockReport:
    """What `block_linears` swapped (name -> format) and left alone (name -> reason)."""

    swapped: dict[str, str] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    bytes_before: int = 0
    bytes_after: int = 0

    def __str__(self) -> str:
        formats = {f: list(self.swapped.values()).count(f) for f in FORMATS if f in self.swapped.values()}
        s = f"block_linear: swapped={len(self.swapped)} {formats} weights {self.bytes_before:,} -> {self.bytes_after:,} bytes"
        return s + (f" skipped={len(self.skipped)}" if self.skipped else "")


@contextlib.contextmanager
def block_linears(model: nn.Module) -> Iterator[BlockReport]:
    """Within the block, every bias-free fp32 `nn.Linear` of `model` whose weight a block format
    holds exactly is a `BlockLinear`; on exit the original modules are back. Yields the report
    (empty when the kernel is unavailable)."""
    report = BlockReport()
    if not available():
        yield report
        return
    originals: list[tuple[nn.Module, str, nn.Module]] = []
    packed: dict[int, BlockLinear] = {}  # one packed copy per weight tensor (tied weights share it)
    for name, mod in list(model.named_modules()):
        if type(mod) is not nn.Linear:
            continue
        if mod.bias is not None:
            report.skipped[name] = "has a bias"
            continue
        key = id(mod.weight)
        if key not in packed:
            bw, why = block_weight(mod.weight)
            if bw is None:
                report.skipped[name] = why
                continue
            packed[key] = BlockLinear(bw)
            report.bytes_before += mod.weight.numel() * 4
            report.bytes_after += bw.nbytes
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        originals.append((parent, attr, mod))
        setattr(parent, attr, packed[key])
        report.swapped[name] = packed[key].format
    for name, why in report.skipped.items():
        log.info("propd: %s stays an fp32 linear: %s", name, why)
    try:
        yield report
    finally:
        for parent, attr, mod in originals:
            setattr(parent, attr, mod)
