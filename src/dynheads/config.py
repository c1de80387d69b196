"""The resolved run description written first into every run folder."""
from __future__ import annotations

import importlib.metadata
import time
from dataclasses import asdict, is_dataclass
from typing import Any

import torch

from dynheads.models import LoadedModel


def versions() -> dict[str, str]:
    out = {}
    for pkg in ("dynheads", "torch", "transformers", "numpy", "scikit-learn"):
        try:
            out[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            out[pkg] = "not installed"
    return out


def layout_dict(layout) -> dict[str, Any]:
    """The run config's layout: layers and heads, plus the sliding-window layers of a model that has them."""
    out = asdict(layout)
    if not layout.sliding_layers:
        out.pop("sliding_window"), out.pop("sliding_layers")
    return out


def run_config(kind: str, lm: LoadedModel, seed: int, **parts: Any) -> dict[str, Any]:
    """Config dict: kind, model (path, fingerprint, layout), seed, the given parts (`inputs`: resolved paths
    and content hashes of input files), versions, threads."""
    return {
        "kind": kind,
        "model": lm.describe(),
        "layout": layout_dict(lm.layout),
        "seed": seed,
        **{k: asdict(v) if is_dataclass(v) else v for k, v in parts.items()},
        "versions": versions(),
        "threads": torch.get_num_threads(),  # intra-op threads (global --threads); may differ on resume
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
