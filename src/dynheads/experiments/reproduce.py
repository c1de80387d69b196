"""`dynheads reproduce`: every experiment of the paper, each in its own sub-folder of one output folder.

Steps run in a fixed order; the model-using ones are the existing experiments with their own per-sample
resume, the analyses are pure functions of those run folders. `<out>/reproduce.json` holds the resolved
preset and, per step, its status, the equivalent `dynheads` command and its wall time, so a rerun after a
kill resumes the unfinished step and a rerun when everything is done only rebuilds the report. A step that
cannot run (no HotpotQA file, too few samples for a probe) is recorded with its reason and skipped; the
report then says "not comparable" with that reason. Sizes: `PRESETS` (smoke: this 2-core machine in
~30 minutes; paper: the paper's grids, for GPU users), each overridable.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any, Callable

from dynheads.errors import ConfigError, DataError, DynheadsError, Interrupted

DEFAULT_HOTPOTQA = "../shared/data/hotpotqa/hotpotqa_dev_distractor_first100_hf.json"
STATE = "reproduce.json"


@dataclass(frozen=True)
class Preset:
    """Sizes of every experiment; `hotpotqa` records [detection) and [eval) are disjoint slices of one file."""

    niah_lengths: tuple[int, ...] = (500,)
    niah_depths: tuple[float, ...] = (0, 25, 50, 75, 100)
    niah_per_cell: int = 30  # claim 1 + claim 3 share this run (150 samples)
    topk: int = 5  # top-k attended positions recorded for the viewer
    cca_max_offset: int = 5
    probe_offsets: tuple[int, ...] = (0, 1, 2, 5)
    ablation_lengths: tuple[int, ...] = (500,)
    ablation_depths: tuple[float, ...] = (0, 25, 50, 75, 100)
    ablation_per_cell: int = 6  # claim 2 (30 samples)
    progressive_length: int = 500
    progressive_samples: int = 5
    progressive_ks: tuple[int, ...] = (0, 1, 2, 5)
    hotpotqa: str = DEFAULT_HOTPOTQA
    multihop_records: tuple[int, int] = (30, 50)  # detection questions (Eq. 2 ranking, regressor, Fig. 6)
    rag_records: tuple[int, int] = (0, 5)  # evaluated questions (Table 4); 6 strategies each
    rag_strategies: tuple[str, ...] = ("dynamic", "static", "dynamic-random", "fixed-random", "none", "full")
    multihop_max_new_tokens: int = 16
    rag_max_new_tokens: int = 32
    max_new_tokens: int = 48
    seed: int = 0
    prompt_style: str = "auto"  # tasks/base.py: auto | chat | completion, for every step that builds prompts


PRESETS = {
    "smoke": Preset(),
    # The paper's grids (App. A.1-A.5, Sec. 5): NIAH 5k-50k tokens x depths 0-100% in 10% steps; Fig. 3 at 5000
    # tokens with 20 runs and k = 0..70; CCA k = 0..10. Table 4 used 500 questions; the shared file has 100.
    "paper": Preset(niah_lengths=tuple(range(5000, 50001, 5000)), niah_depths=tuple(range(0, 101, 10)),
                    niah_per_cell=2, cca_max_offset=10, probe_offsets=(0, 1, 2, 5),
                    ablation_lengths=tuple(range(5000, 50001, 5000)), ablation_depths=tuple(range(0, 101, 10)),
                    ablation_per_cell=1, progressive_length=5000, progressive_samples=20,
                    progressive_ks=tuple(range(0, 71, 5)), multihop_records=(50, 100), rag_records=(0, 50),
                    multihop_max_new_tokens=32, rag_max_new_tokens=100),
}


@dataclass(frozen=True)
class Step:
    """One experiment: its name, sub-folder, whether it needs the model, and the equivalent CLI command."""

    name: str
    folder: str
    needs_model: bool
    command: str
    run: Callable[..., Any]


def preset(name: str, **overrides: Any) -> Preset:
    """A named preset with the given fields replaced (None values are ignored)."""
    if name not in PRESETS:
        raise ConfigError(f"unknown preset '{name}'; choose one of: {', '.join(PRESETS)}")
    known = {f.name for f in fields(Preset)}
    bad = [k for k in overrides if k not in known]
    if bad:
        raise ConfigError(f"unknown preset field '{bad[0]}'")
    return replace(PRESETS[name], **{k: v for k, v in overrides.items() if v is not None})


def steps(p: Preset, out: Path, model: str) -> list[Step]:
    """The experiments in order; later steps read the folders of earlier ones."""
    from dynheads.experiments import ablation as abl
    from dynheads.experiments import cca, dynamism, probe_table
    from dynheads.experiments import progressive as prog
    from dynheads.experiments.probes import ProbeConfig
    from dynheads.experiments.trace import run_multihop, run_niah
    from dynheads.runs import RunDir
    from dynheads.tasks.niah import NiahConfig
    from dynheads.tracing.tracer import TraceConfig

    j = lambda xs: ",".join(f"{x:g}" if isinstance(x, float) else str(x) for x in xs)  # noqa: E731
    d = lambda name: out / name  # noqa: E731
    niah = NiahConfig(p.niah_lengths, tuple(map(float, p.niah_depths)), p.niah_per_cell, seed=p.seed,
                      prompt_style=p.prompt_style)
    grid = NiahConfig(p.ablation_lengths, tuple(map(float, p.ablation_depths)), p.ablation_per_cell, seed=p.seed,
                      prompt_style=p.prompt_style)
    style = f" --prompt-style {p.prompt_style}"
    trace = TraceConfig(max_new_tokens=p.max_new_tokens)
    det, ev = d("data") / "hotpotqa_detection.json", d("data") / "hotpotqa_eval.json"
    out_steps = [
        Step("niah", "niah", True, f"dynheads niah --model {model} --lengths {j(p.niah_lengths)} --depths "
             f"{j(p.niah_depths)} --samples-per-cell {p.niah_per_cell} --topk {p.topk} --max-new-tokens "
             f"{p.max_new_tokens} --seed {p.seed}{style} --out {d('niah')}",
             lambda lm: run_niah(lm, niah, d("niah"), replace(trace, topk=p.topk), True)),
        Step("dynamism", "niah", False, f"dynheads dynamism {d('niah')}",
             lambda lm: dynamism.run(RunDir.open(d("niah")))),
        Step("cca", "niah", False, f"dynheads cca {d('niah')} --max-offset {p.cca_max_offset}",
             lambda lm: cca.run(RunDir.open(d("niah")), cca.CcaConfig(max_offset=p.cca_max_offset))),
    ]
    for k in p.probe_offsets:
        out_steps.append(Step(f"probe_k{k}", "niah", False, f"dynheads probe {d('niah')} --offset {k}",
                              lambda lm, k=k: probe_table.run(RunDir.open(d("niah")), ProbeConfig(offset=k))))
    cfg = abl.AblationConfig(seed=p.seed)
    out_steps += [
        Step("ablation", "ablation", True, f"dynheads ablate --model {model} --lengths {j(p.ablation_lengths)} "
             f"--depths {j(p.ablation_depths)} --samples-per-cell {p.ablation_per_cell} --max-new-tokens "
             f"{p.max_new_tokens} --seed {p.seed}{style} --out {d('ablation')}",
             lambda lm: abl.run_ablation(lm, grid, d("ablation"), cfg, trace, True)),
        Step("progressive", "progressive", True, f"dynheads ablate-progressive --model {model} --length "
             f"{p.progressive_length} --ks {j(p.progressive_ks)} --samples {p.progressive_samples} "
             f"--max-new-tokens {p.max_new_tokens} --seed {p.seed}{style} --out {d('progressive')}",
             lambda lm: prog.run_progressive(lm, prog.progressive_niah(p.progressive_length, p.progressive_samples,
                                                                       p.seed, prompt_style=p.prompt_style),
                                             p.progressive_ks, d("progressive"), cfg, trace, True)),
        Step("multihop", "multihop", True, f"dynheads multihop --model {model} --data {det} --limit "
             f"{_count(p.multihop_records)} --max-new-tokens {p.multihop_max_new_tokens}{style} --out {d('multihop')}",
             lambda lm: run_multihop(lm, _split(p, out)[0], None, d("multihop"),
                                     TraceConfig(max_new_tokens=p.multihop_max_new_tokens), quiet=True,
                                     prompt_style=p.prompt_style)),
        Step("probe_regress_k0", "multihop", False, f"dynheads probe {d('multihop')} --regress",
             lambda lm: probe_table.run(RunDir.open(d("multihop")), ProbeConfig(regress=True))),
        Step("rag", "rag", True, f"dynheads rag --model {model} --data {ev} --limit {_count(p.rag_records)} "
             f"--heads {','.join(p.rag_strategies)} --static-ranking {d('multihop')} --regressor {d('multihop')} "
             f"--prompt short --max-new-tokens {p.rag_max_new_tokens} --max-sentence-tokens 32{style} --out {d('rag')}",
             lambda lm: _run_rag(lm, p, out)),
    ]
    return out_steps


def reproduce(model: str, p: Preset, out: str | Path, preset_name: str = "custom", load=None,
              log: Callable[[str], None] = print, only: tuple[str, ...] | None = None) -> dict[str, Any]:
    """Run every unfinished step (or only the named ones) into `out`; returns the state dict.

    `load(model)` loads the model lazily, only when a model step still has work to do.
    """
    from dynheads.runs import check_out

    out = Path(out)
    check_out(out)  # everything that needs no model, before the folder or the model
    check_hotpotqa(p)
    todo = steps(p, out, model)
    unknown = sorted(set(only or ()) - {s.name for s in todo})
    if unknown:
        raise ConfigError(f"unknown step '{unknown[0]}'; steps: {', '.join(s.name for s in todo)}")
    state = _open_state(out, model, p, preset_name)
    lm = None
    for step in todo:
        entry = state["steps"].get(step.name, {})
        if entry.get("status") in ("done", "skipped") or (only and step.name not in only):
            continue
        if step.needs_model and lm is None:
            if load is None:
                from dynheads.models import load_model

                load = load_model
            lm = load(model)
            state = _record(out, model=lm.describe())
        log(f"[{step.name}] {step.command}")
        before, start = entry.get("wall_s_before", 0.0), time.time()
        try:
            step.run(lm)
            entry = {"status": "done"}
        except (KeyboardInterrupt, Interrupted):  # the time spent so far counts toward the step on resume
            _record(out, {step.name: {"status": "interrupted", "command": step.command, "folder": step.folder,
                                      "wall_s_before": round(before + time.time() - start, 1)}})
            raise
        except DynheadsError as exc:  # recorded; the report marks what depends on it "not comparable"
            entry = {"status": "skipped", "reason": str(exc)}
            log(f"[{step.name}] skipped: {exc}")
        entry.update(command=step.command, folder=step.folder, wall_s=round(before + time.time() - start, 1))
        state = _record(out, {step.name: entry})
    return state


def check_hotpotqa(p: Preset) -> None:
    """The HotpotQA slices, before anything runs: detection and evaluation records must not overlap (the RAG
    step would refuse them only after the multi-hop step), and a file given instead of the default must exist
    and hold both slices. A missing *default* file is not an error: its steps are recorded as skipped."""
    (da, db), (ea, eb) = p.multihop_records, p.rag_records
    for name, (a, b) in (("detection", p.multihop_records), ("evaluation", p.rag_records)):
        if not 0 <= a < b:
            raise ConfigError(f"HotpotQA {name} records {a}-{b} are empty or negative")
    if max(da, ea) < min(db, eb):
        hint = f"; here --rag-questions can be at most {da - ea}" if ea < da else ""
        raise ConfigError(f"HotpotQA evaluation records {ea}-{eb} overlap the detection records {da}-{db}: Dynamic "
                          f"RAG must be evaluated on other questions than its heads were detected on{hint}")
    src = Path(p.hotpotqa)
    if p.hotpotqa == DEFAULT_HOTPOTQA and not src.exists():
        return
    if not src.is_file():
        raise ConfigError(f"--hotpotqa {src} {'is a folder' if src.is_dir() else 'does not exist'}")
    n = len(_hotpotqa_records(src))
    if max(db, eb) > n:
        raise ConfigError(f"{src} has {n} records; records {da}-{db} (detection) and {ea}-{eb} (evaluation) "
                          "are requested")


def read_state(out: str | Path) -> dict[str, Any]:
    """The reproduction state of `out` (reproduce.json), checked to be one."""
    path = Path(out) / STATE
    if not path.is_file():
        raise ConfigError(f"{out} holds no reproduction ({STATE} is missing); run `dynheads reproduce` first")
    return _load_state(path)


# --- internals -----------------------------------------------------------------------------
def _count(records: tuple[int, int]) -> int:
    return records[1] - records[0]


def _split(p: Preset, out: Path) -> tuple[Path, Path]:
    """Write the detection and evaluation question files (disjoint record slices of p.hotpotqa)."""
    src = Path(p.hotpotqa)
    if not src.is_file():
        raise DataError(f"HotpotQA file {src} not found (give --hotpotqa)")
    records = _hotpotqa_records(src)
    folder = out / "data"
    folder.mkdir(parents=True, exist_ok=True)
    paths = folder / "hotpotqa_detection.json", folder / "hotpotqa_eval.json"
    for path, (a, b) in zip(paths, (p.multihop_records, p.rag_records)):
        if b > len(records) or a >= b:
            raise DataError(f"{src} has {len(records)} records; records {a}-{b} requested")
        path.write_text(json.dumps(records[a:b]))
    return paths


def _hotpotqa_records(src: Path) -> list:
    try:
        records = json.loads(src.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        records = None
    if not isinstance(records, list):
        raise DataError(f"{src} is not a JSON list of HotpotQA records")
    return records


def _run_rag(lm, p: Preset, out: Path):
    from dynheads.experiments import rag as rag_exp
    from dynheads.tasks.multihop import MultihopConfig
    from dynheads.rag.loop import RagConfig

    if not (out / "multihop" / "samples").is_dir():
        raise DataError("the multihop detection run is missing (its step was skipped)")
    settings = rag_exp.RagSettings(MultihopConfig(str(_split(p, out)[1]), None, "auto", "short", p.prompt_style),
                                   p.rag_strategies,
                                   seed=p.seed, loop=RagConfig(max_new_tokens=p.rag_max_new_tokens,
                                                               max_sentence_tokens=32))
    return rag_exp.run_rag(lm, settings, out / "rag", str(out / "multihop"), str(out / "multihop"), True)


def _open_state(out: Path, model: str, p: Preset, preset_name: str) -> dict[str, Any]:
    from dynheads.runs import _first_difference

    config = {"model": model, "preset": preset_name, "sizes": json.loads(json.dumps(asdict(p)))}
    path = out / STATE
    if path.is_file():
        state = _load_state(path)
        diff = _first_difference(state["config"], config)
        if diff:
            raise ConfigError(f"{out} holds a reproduction with other settings ({diff}); use another --out")
        return state
    out.mkdir(parents=True, exist_ok=True)
    state = {"config": config, "created": time.strftime("%Y-%m-%dT%H:%M:%S"), "steps": {}}
    _write_state(out, state)
    return state


def _load_state(path: Path) -> dict[str, Any]:
    """reproduce.json as written by `_write_state`; anything else is one DataError."""
    try:
        state = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        raise DataError(f"{path} is not JSON: it was not written by `dynheads reproduce`, or is damaged") from None
    shape = isinstance(state, dict) and isinstance(state.get("config"), dict) and isinstance(state.get("steps"), dict)
    if not shape or not isinstance(state["config"].get("sizes"), dict):
        raise DataError(f"{path} is not a reproduction state (a JSON object with 'config' and 'steps'); it was not "
                        "written by `dynheads reproduce`, or is damaged")
    return state


def _record(out: Path, steps: dict[str, Any] | None = None, **top: Any) -> dict[str, Any]:
    """Update step entries / top-level keys of the stored state (re-read first: runs of other --steps may share it)."""
    state = json.loads((out / STATE).read_text())
    state["steps"].update(steps or {})
    state.update(top)
    _write_state(out, state)
    return state


def _write_state(out: Path, state: dict[str, Any]) -> None:
    tmp = out / f"{STATE}.tmp{os.getpid()}"
    tmp.write_text(json.dumps(state, indent=2))
    tmp.replace(out / STATE)
