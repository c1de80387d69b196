"""A sweep SPEC (TOML): models × experiments × their parameters × seeds → cells, one run folder each.

    models = ["default"]            # or inline tables: {source = "...", dtype = "bfloat16", device_map = "auto"}
    seeds = [0, 1]                  # crossed with every experiment that takes a seed

    [[experiments]]
    name = "niah"                   # a model-running command: niah, ablate, ablate-progressive, multihop, rag
    lengths = [1000]                # the command's flags, snake_case, TOML-typed (defaults: the command's)
    depths = [0, 100]
    [experiments.grid]              # optional: one cell per value (cross product over the keys)
    max_new_tokens = [32, 48]

A cell's folder name is `<label>__<model>[__<key>=<value>…][__seed<n>]` (label: the experiment's
`label`, default its name), so a rerun of the same SPEC finds and resumes the same folders.
"""
from __future__ import annotations

import itertools
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dynheads.commands import commands
from dynheads.errors import ConfigError
from dynheads.runs import safe_name

_TOP = {"models", "seeds", "experiments"}
_MODEL_KEYS = {"source", "name", "dtype", "device", "device_map", "max_memory", "offload_folder"}
_EXPERIMENT_KEYS = {"name", "label", "grid", "seeds"}


@dataclass(frozen=True)
class ModelSpec:
    """How every worker loads one model (the model-loading flags of the commands)."""

    source: str = "default"
    name: str = ""  # folder-name part; default: the source's file or folder name
    dtype: str = "float32"
    device: str = "cpu"
    device_map: str | None = None  # accelerate device map (placement.py); JSON objects are given as text
    max_memory: str | None = None
    offload_folder: str | None = None

    def load(self, weights: bool = True):
        from dynheads.models import load_model
        from dynheads.placement import parse_placement

        placement = parse_placement(self.device_map, self.max_memory, self.offload_folder) if weights else None
        return load_model(self.source, dtype=self.dtype, device=self.device, placement=placement, weights=weights)


@dataclass(frozen=True)
class Cell:
    """One run: a command with its parameters on one model, written to `name` under the sweep folder."""

    name: str
    model: ModelSpec
    experiment: str
    params: dict[str, Any] = field(default_factory=dict)


def load_spec(path: str | Path) -> list[Cell]:
    """Cells of a SPEC file in run order (models outermost); bad specs are one-line ConfigErrors."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"sweep spec {path} is a folder; give the TOML file")
    try:
        raw = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"sweep spec {path} does not exist") from None
    except OSError as exc:
        raise ConfigError(f"cannot read sweep spec {path} ({exc.strerror})") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"sweep spec {path} is not valid TOML: {exc}") from None
    return cells_of(raw, str(path))


def cells_of(raw: dict[str, Any], where: str = "sweep spec") -> list[Cell]:
    """Expand a parsed SPEC into cells; every parameter is checked against its command's signature."""
    unknown = sorted(set(raw) - _TOP)
    if unknown:
        raise ConfigError(f"{where}: unknown key '{unknown[0]}' (keys: {', '.join(sorted(_TOP))})")
    experiments = raw.get("experiments")
    if not isinstance(experiments, list) or not experiments:
        raise ConfigError(f"{where}: no [[experiments]] given")
    default_models = [_model(m, where) for m in _as_list(raw.get("models", ["default"]), "models", where)]
    default_seeds = _seeds(raw.get("seeds", [0]), where)
    cells: list[Cell] = []
    for model in default_models:
        for i, exp in enumerate(experiments):
            cells.extend(_expand(exp, i, model, default_seeds, where))
    names = [c.name for c in cells]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ConfigError(f"{where}: two cells would share the folder '{dupes[0]}'; give the experiments a 'label'")
    return cells


# --- internals -----------------------------------------------------------------------------
def _expand(exp: Any, index: int, model: ModelSpec, default_seeds: list[int], where: str) -> list[Cell]:
    if not isinstance(exp, dict) or "name" not in exp:
        raise ConfigError(f"{where}: experiment {index + 1} has no 'name'")
    name = exp["name"]
    command = commands.get(name)
    where = f"{where}: experiment '{exp.get('label', name)}'"
    known = command.params()
    grid = exp.get("grid", {})
    if not isinstance(grid, dict):
        raise ConfigError(f"{where}: 'grid' must be a table of parameter = [values]")
    fixed = {k: v for k, v in exp.items() if k not in _EXPERIMENT_KEYS}
    for key in list(fixed) + list(grid):
        if key == "seed":
            raise ConfigError(f"{where}: set seeds with 'seeds = [...]', not 'seed'")
        if key not in known:
            raise ConfigError(f"{where}: unknown parameter '{key}' (parameters: {', '.join(sorted(known))})")
    both = sorted(set(fixed) & set(grid))
    if both:
        raise ConfigError(f"{where}: parameter '{both[0]}' is both fixed and in the grid")
    for key, values in grid.items():
        if not isinstance(values, list) or not values:
            raise ConfigError(f"{where}: grid '{key}' must be a non-empty list of values")
    types = _param_types(command.run)
    for key, value in fixed.items():
        _check_type(key, value, types.get(key), known[key], where)
    for key, values in grid.items():
        for value in values:
            _check_type(key, value, types.get(key), known[key], f"{where}: grid")
    seeds = _seeds(exp["seeds"], where) if "seeds" in exp else default_seeds
    if "seed" not in known:
        seeds = [None]
    label = safe_name(str(exp.get("label", name)))
    cells = []
    for combo in itertools.product(*grid.values()):
        chosen = dict(zip(grid, combo))
        for seed in seeds:
            params = {**fixed, **chosen, **({} if seed is None else {"seed": seed})}
            parts = [label, _model_name(model)] + [f"{k}={_value_name(v)}" for k, v in chosen.items()]
            parts += [] if seed is None else [f"seed{seed}"]
            cells.append(Cell(safe_name("__".join(parts)), model, name, params))
    return cells


def _param_types(run) -> dict[str, Any]:
    """The annotated types of a command's parameters (`int`, `str | None`, …)."""
    try:
        return typing.get_type_hints(run)
    except (NameError, TypeError):  # an annotation that does not resolve: defaults decide
        return {}


_TYPE_NAMES = {int: "an integer", float: "a number", str: "a string", bool: "true or false"}


def _fits(value: Any, kind: Any) -> bool:
    if kind is bool:
        return isinstance(value, bool)
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if kind is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind is str:
        return isinstance(value, str)
    return True  # a type TOML cannot spell: the command's own check decides


def _check_type(key: str, value: Any, hint: Any, default: Any, where: str) -> None:
    """A SPEC value must have the type of its command parameter (TOML types: the CLI's own parsing does not
    run here), so a wrong type is one ConfigError before any model loads, not a crash inside a run."""
    if hint is None:
        if isinstance(default, tuple):  # a list flag: a TOML array of plain values, or comma-separated text
            plain = isinstance(value, list) and value and all(
                isinstance(v, (str, int, float)) and not isinstance(v, bool) for v in value)
            if not (plain or isinstance(value, str)):
                raise ConfigError(f"{where}: '{key}' expects a non-empty list of values, got {value!r}")
        return
    kinds = [k for k in (typing.get_args(hint) or (hint,)) if k is not type(None)]
    if not any(_fits(value, k) for k in kinds):
        want = " or ".join(_TYPE_NAMES.get(k, getattr(k, "__name__", str(k))) for k in kinds)
        raise ConfigError(f"{where}: '{key}' expects {want}, got {value!r}")


def _model(entry: Any, where: str) -> ModelSpec:
    if isinstance(entry, str):
        return ModelSpec(entry)
    if not isinstance(entry, dict) or "source" not in entry:
        raise ConfigError(f"{where}: a model is a source string or a table with 'source'")
    unknown = sorted(set(entry) - _MODEL_KEYS)
    if unknown:
        raise ConfigError(f"{where}: unknown model key '{unknown[0]}' (keys: {', '.join(sorted(_MODEL_KEYS))})")
    fields = dict(entry)
    if isinstance(fields.get("device_map"), dict):  # an inline table is a module -> device map
        import json

        fields["device_map"] = json.dumps(fields["device_map"])
    if isinstance(fields.get("max_memory"), dict):
        fields["max_memory"] = ",".join(f"{k}={v}" for k, v in fields["max_memory"].items())
    return ModelSpec(**fields)


def _model_name(model: ModelSpec) -> str:
    if model.name:
        return model.name
    source = model.source.rstrip("/")
    if source.startswith(("/", ".", "~")) or Path(source).exists():  # a file or folder: its own name
        path = Path(source).expanduser()
        return path.stem if path.suffix == ".gguf" else path.name
    return source.replace("/", "_")  # "default" or a cached Hub id (org/name)


def _value_name(value: Any) -> str:
    return "-".join(str(v) for v in value) if isinstance(value, list) else str(value)


def _seeds(value: Any, where: str) -> list[int]:
    seeds = _as_list(value, "seeds", where)
    if not seeds or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds):
        raise ConfigError(f"{where}: 'seeds' must be a non-empty list of integers")
    return list(dict.fromkeys(seeds))


def _as_list(value: Any, key: str, where: str) -> list:
    if not isinstance(value, list):
        raise ConfigError(f"{where}: '{key}' must be a list")
    return value
