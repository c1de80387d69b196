"""Where a model's layers live: accelerate device maps, per-device memory caps, CPU/disk offload.

A model larger than one device is loaded across several (`device_map="auto"` / `"balanced"` /
an explicit module → device JSON), or with layers offloaded to CPU memory or to disk. accelerate's
hooks move each layer's inputs to that layer's device, so the tracer and the interventions see
ordinary tensors; what they create themselves must follow the tensors they are given (see README,
"Models larger than one device").
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dynheads.errors import ConfigError

STRATEGIES = ("auto", "balanced", "balanced_low_0", "sequential")
_SIZE = re.compile(r"^\d+(\.\d+)?\s*([KMGT]i?B)?$", re.IGNORECASE)


@dataclass(frozen=True)
class Placement:
    """accelerate placement of one model (None everywhere: the whole model on `--device`)."""

    device_map: str | dict[str, Any] | None = None  # a strategy name or module name -> device (int, "cpu", "disk")
    max_memory: dict[str | int, str] | None = None  # device -> cap, e.g. {0: "20GiB", "cpu": "60GiB"}
    offload_folder: str | None = None  # where "disk" layers are written (needed when any layer goes to disk)

    def from_pretrained_args(self) -> dict[str, Any]:
        """Keyword arguments of `from_pretrained` for this placement."""
        if self.device_map is None:
            return {}
        out: dict[str, Any] = {"device_map": self.device_map}
        if self.max_memory:
            out["max_memory"] = dict(self.max_memory)
        if self.offload_folder:
            out["offload_folder"] = self.offload_folder
        return out

    def describe(self) -> dict[str, Any] | None:
        """What goes into a run's config (None for an undispatched model)."""
        if self.device_map is None:
            return None
        return {"device_map": self.device_map, "max_memory": self.max_memory, "offload_folder": self.offload_folder}


def parse_placement(device_map: str | None, max_memory: str | None = None,
                    offload_folder: str | None = None) -> Placement | None:
    """CLI spellings → Placement (None when no device map is asked for); bad input is a ConfigError."""
    if device_map is None:
        if max_memory or offload_folder:
            raise ConfigError("--max-memory and --offload-folder need --device-map")
        return None
    return Placement(_parse_device_map(device_map), _parse_max_memory(max_memory), offload_folder)


def dispatch(model, placement: Placement):
    """Place an already built model (e.g. one made from a config) with accelerate; returns the model.

    A strategy name is resolved with `infer_auto_device_map` under `max_memory`; layers mapped to
    "disk" are written to `offload_folder` and read back layer by layer at every forward.
    """
    from accelerate import dispatch_model, infer_auto_device_map
    from accelerate.utils import get_balanced_memory

    device_map = placement.device_map
    if isinstance(device_map, str):
        no_split = getattr(model, "_no_split_modules", None) or []
        memory = dict(placement.max_memory) if placement.max_memory else None
        if device_map != "sequential":
            memory = get_balanced_memory(model, max_memory=memory, no_split_module_classes=no_split,
                                         low_zero=device_map == "balanced_low_0")
        device_map = infer_auto_device_map(model, max_memory=memory, no_split_module_classes=no_split)
    offload_dir = placement.offload_folder
    if "disk" in device_map.values() and offload_dir is None:
        raise ConfigError("layers mapped to 'disk' need --offload-folder")
    model = dispatch_model(model, device_map=device_map, offload_dir=offload_dir)
    model.hf_device_map = dict(device_map)
    return model


# --- internals -----------------------------------------------------------------------------
def _parse_device_map(text: str) -> str | dict[str, Any]:
    text = text.strip()
    if text in STRATEGIES:
        return text
    source = text
    if not text.startswith("{") and Path(text).expanduser().is_file():
        source = Path(text).expanduser().read_text()
    try:
        mapping = json.loads(source)
    except json.JSONDecodeError:
        raise ConfigError(f"--device-map expects one of {', '.join(STRATEGIES)}, a JSON object or a JSON file, "
                          f"got '{text}'") from None
    if not isinstance(mapping, dict) or not mapping:
        raise ConfigError("--device-map JSON must be a non-empty object of module name -> device")
    for module, device in mapping.items():
        if not (isinstance(device, int) or (isinstance(device, str) and re.match(r"^(cpu|disk|meta|mps|cuda(:\d+)?|\d+)$",
                                                                              device))):
            raise ConfigError(f"--device-map: module '{module}' has device {device!r}; "
                              "use a GPU index, 'cuda:N', 'cpu' or 'disk'")
    return {k: int(v) if isinstance(v, str) and v.isdigit() else v for k, v in mapping.items()}


def _parse_max_memory(text: str | None) -> dict[str | int, str] | None:
    if not text:
        return None
    text = text.strip()
    if text.startswith("{"):
        try:
            pairs = list(json.loads(text).items())
        except (json.JSONDecodeError, AttributeError):
            raise ConfigError(f"--max-memory JSON is malformed: '{text}'") from None
    else:
        pairs = [tuple(p.split("=", 1)) for p in text.split(",") if p.strip()]
    out: dict[str | int, str] = {}
    for pair in pairs:
        if len(pair) != 2 or not _SIZE.match(str(pair[1]).strip()):
            raise ConfigError(f"--max-memory expects DEVICE=SIZE pairs like 0=20GiB,cpu=60GiB, got '{text}'")
        key, size = str(pair[0]).strip(), str(pair[1]).strip()
        out[int(key) if key.isdigit() else key] = size
    return out
