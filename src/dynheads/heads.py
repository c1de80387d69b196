"""Head bookkeeping sized from the model config: a head is (layer, query head), printed `L{layer}-H{head}`."""
from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from dynheads.errors import ConfigError

_LABEL = re.compile(r"^L?(\d+)-H?(\d+)$")


@dataclass(frozen=True)
class HeadLayout:
    """Layers × query heads of a model; GQA models score each query head on its own.

    Hybrid models (Gemma 2/3, Cohere 2, GPT-OSS, …) also record which layers attend through a sliding
    window of `sliding_window` keys (a query at position q sees keys q - W < k ≤ q) and which globally.
    """

    n_layers: int
    n_heads: int
    n_kv_heads: int
    sliding_window: int | None = None
    sliding_layers: tuple[int, ...] = ()

    def __post_init__(self):
        object.__setattr__(self, "sliding_layers", tuple(int(i) for i in self.sliding_layers))  # JSON gives a list

    @classmethod
    def from_config(cls, config) -> "HeadLayout":
        cfg = config.get_text_config() if hasattr(config, "get_text_config") else config
        n_heads = int(cfg.num_attention_heads)
        n_kv = int(getattr(cfg, "num_key_value_heads", None) or n_heads)
        n_layers = int(cfg.num_hidden_layers)
        window = getattr(cfg, "sliding_window", None)
        types = getattr(cfg, "layer_types", None)
        if not window or getattr(cfg, "use_sliding_window", True) is False:
            sliding: tuple[int, ...] = ()
        elif types:
            sliding = tuple(i for i, t in enumerate(types) if t == "sliding_attention")
        else:  # a window without layer types applies to every layer (Mistral)
            sliding = tuple(range(n_layers))
        return cls(n_layers, n_heads, n_kv, int(window) if sliding else None, sliding)

    @property
    def global_layers(self) -> tuple[int, ...]:
        return tuple(i for i in range(self.n_layers) if i not in self.sliding_layers)

    @property
    def is_hybrid(self) -> bool:
        """Some layers attend through a sliding window and some globally."""
        return bool(self.sliding_layers) and bool(self.global_layers)

    @property
    def n_total(self) -> int:
        return self.n_layers * self.n_heads

    @property
    def shape(self) -> tuple[int, int]:
        return (self.n_layers, self.n_heads)

    @property
    def group_size(self) -> int:
        return self.n_heads // self.n_kv_heads

    def kv_head(self, head: int) -> int:
        """The KV head a query head reads (as transformers' repeat_kv assigns them)."""
        return head // self.group_size

    def label(self, layer: int, head: int) -> str:
        return f"L{layer}-H{head}"

    def labels(self) -> list[str]:
        """Labels in flat layer-major order (index = layer * n_heads + head)."""
        return [self.label(l, h) for l in range(self.n_layers) for h in range(self.n_heads)]

    def parse(self, label: str) -> tuple[int, int]:
        """Accepts `L12-H3` and Retrieval_Head's `12-3`; checks the head exists in this model."""
        m = _LABEL.match(label.strip())
        if not m:
            raise ConfigError(f"'{label}' is not a head label like L12-H3 or 12-3")
        layer, head = int(m.group(1)), int(m.group(2))
        if layer >= self.n_layers or head >= self.n_heads:
            raise ConfigError(
                f"head {label} does not exist in a model with {self.n_layers} layers × {self.n_heads} heads"
            )
        return layer, head

    def mask_from_flat(self, flat_indices) -> np.ndarray:
        """Boolean [layers, heads] mask with the given flat (layer-major) indices set."""
        mask = np.zeros(self.n_total, dtype=bool)
        mask[np.asarray(list(flat_indices), dtype=np.int64)] = True
        return mask.reshape(self.shape)
