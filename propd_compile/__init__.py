"""propd-compile: lossless ProPD token-tree decoding for Hugging Face causal LMs."""
from propd_compile import models
from propd_compile.api import accelerate, is_accelerated, restore
from propd_compile.config import ProPDConfig
from propd_compile.decoding import DecodeStats

__all__ = ["ProPDConfig", "DecodeStats", "accelerate", "restore", "is_accelerated", "models"]
__version__ = "0.1.0"
