"""Head-sparse decoding at equal budget: does a dynamic head set beat a static one?

Every sample is prefilled once; each policy × budget forks that prefill (tracer `heads=`), so the
prompt is never re-run. A policy is a head set (headsets/: `--policies` names in names.py, the tracer
callback in apply.py) counting `--unit` heads; its random generator at step t is seeded from (seed,
sample id, t). Per condition: the answer metrics, the units open at every step, and the KV read per step
as a fraction of the full cache (closed units still read their S + W keys; sparse.py `Sparsity.kv_read`)
plus what deciding costs (`decision_cost`: page summaries and refined pages for `query`, the probe's
weights for `predicted` and `layerwise`). Summary: bootstrap 95% intervals over samples, paired tests of
each deployable dynamic policy (and the oracle, an upper bound) against `static` at each budget, the share
of the oracle − static gap each closes, and a figure of accuracy against KV read.

The detection run (a traced run folder of *other* samples, with hidden states) gives everything a policy
learns: the static ranking (its head score's activation frequency, as `dynheads ablate --static-ranking`),
the `predicted` policy's probe (hidden state at step n → active heads at n + 1; probes.fit_probe, offset 1,
activity by the run's registered score; <out>/predictor.pt), and, from its prompts decoded again with
every head open (one pass shared by both: `fit_in_step`), the `query` policy's scorer and thresholds
(<out>/query_thresholds.json) and the `layerwise` probe (<out>/layer_probe.pt); a resumed run reuses all
of them. A detection run that shares a
sample with the evaluated ones is refused.
"""
from __future__ import annotations

import hashlib
import json
import zlib
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Callable

import numpy as np

from dynheads.analyses.rankings import ranking_from_run
from dynheads.analyses.stats import sample_rng
from dynheads.analyses.stats import ABOVE, ALPHA, BELOW, MIN_PAIRS, bootstrap_ci, paired_difference, paired_verdict
from dynheads.config import run_config
from dynheads.errors import ConfigError
from dynheads.headsets import apply
from dynheads.headsets.base import IN_LAYER, build
from dynheads.headsets.in_step import DEFAULT_PAGE as QUERY_PAGE
from dynheads.headsets.in_step import DEFAULT_REFINE as QUERY_REFINE
from dynheads.headsets.in_step import QueryScorer
from dynheads.headsets.in_step import decision_read, layer_pull, probe_read
from dynheads.headsets.builtin import CONSTANT
from dynheads.headsets.names import SPARSE
from dynheads.models import LoadedModel
from dynheads.runners.detection import load_static_ranking
from dynheads.runs import RunDir
from dynheads.scores.base import get_score
from dynheads.tasks.base import EncodedSample
from dynheads.tasks.metrics import rouge_l
from dynheads.tracing.runner import run_samples
from dynheads.tracing.sparse import Sparsity
from dynheads.tracing.tracer import TraceConfig, Tracer

POLICIES = ("full", "streaming", "static", "random", "oracle", "predicted")  # the default comparison
# decide inside the step (headsets/in_step.py): query calibrated, layerwise's probe fitted on the detection run
KNOWN = POLICIES + ("query", "layerwise")
DEPLOYABLE = ("predicted", "query", "layerwise")  # dynamic policies a deployment could run (the oracle cannot)
BUDGETLESS = tuple(name for name in KNOWN if SPARSE.get(name).name in CONSTANT)  # every head or none: k is moot
METRICS = ("accuracy", "rouge_l", "kv_read")
_GRID_KEYS = ("lengths", "depths", "samples_per_cell", "limit")  # which samples of a source, not the source


@dataclass(frozen=True)
class SparseConfig:
    """The comparison: policies × budgets, what closed heads read, where rankings and probes come from."""

    detection: str  # traced run folder of other samples (static ranking, probe training data)
    policies: tuple[str, ...] = POLICIES
    budgets: tuple[int, ...] = (1, 2, 4, 8, 16)  # units opened per step, over all layers
    sparsity: Sparsity = Sparsity()
    static_ranking: str | None = None  # head_score JSON or run folder overriding the detection run's ranking
    n_boot: int = 2000
    seed: int = 0  # random policy, probe training, bootstrap
    probe_layer: int | None = None  # layerwise: the probe reads the residual after this layer (None: a quarter deep)
    query_refine: int = QUERY_REFINE  # query: pages whose keys each query head reads to refine its pull (0: bound)

    def __post_init__(self):
        for name in self.policies:
            SPARSE.get(name)
        if not self.policies or not self.budgets:
            raise ConfigError("--policies and --budgets must not be empty")
        if min(self.budgets) < 1:
            raise ConfigError(f"--budgets: a budget of {min(self.budgets)} opens no head (that is the 'streaming' "
                              "policy); give budgets of at least 1")
        if self.n_boot < 1:
            raise ConfigError(f"--n-boot must be at least 1, got {self.n_boot}")
        if self.query_refine < 0:
            raise ConfigError(f"--query-refine must be 0 or more pages, got {self.query_refine}")
        if self.probe_layer is not None and self.probe_layer < 0:
            raise ConfigError(f"--probe-layer must be a layer index (0 or more), got {self.probe_layer}")

    def layer_of_probe(self, n_layers: int) -> int:
        """The layer after which `layerwise` reads the residual stream (checked against the model)."""
        layer = max(n_layers // 4 - 1, 0) if self.probe_layer is None else self.probe_layer
        if layer >= n_layers - 1:
            raise ConfigError(f"--probe-layer {layer}: the probe must leave a layer above it (the model has "
                              f"{n_layers} layers, 0..{n_layers - 1})")
        return layer


def conditions(config: SparseConfig) -> list[tuple[str, str, int | None]]:
    """(condition name, policy, budget): budget-free policies once, the others once per budget."""
    out = []
    for name in config.policies:
        out += [(name, name, None)] if name in BUDGETLESS else [(f"{name}@{k}", name, k) for k in config.budgets]
    return out


def sparse_sample(tracer: Tracer, encoded: EncodedSample, config: SparseConfig, inputs: dict[str, Any],
                  metric: Callable[[str, Any], dict]) -> tuple[dict, dict]:
    """One prefill, then every condition forked from it."""
    state = tracer.prefill(encoded.input_ids, encoded.token_spans)
    rng_at = step_generators(config.seed, encoded.sample.id)
    arrays, results = {}, {}
    for cond, name, k in conditions(config):
        heads = build(SPARSE.get(name), k=k, unit=config.sparsity.unit, ranking=inputs["ranking"],
                      predictor=inputs.get("predictor"), threshold=inputs.get("thresholds", {}).get(k),
                      query_scorer=inputs.get("query_scorer"),
                      layer_probe=inputs.get("layer_probe"))
        policy = apply.decoding_policy(heads, encoded, tracer.lm.layout, inputs["score"], inputs["span"], rng_at)
        trace = tracer.generate(state, heads=policy, sparsity=config.sparsity,
                                full_pass_first=apply.needs_full_pass(heads), fork=True)
        opened = np.stack(trace.open_heads) if trace.open_heads else np.zeros((0, *inputs["shape"]), bool)
        kv = [config.sparsity.kv_read(o, encoded.prompt_len + t, tracer.lm.layout.group_size)
              for t, o in enumerate(opened)]
        kv = [r + decision_cost(name, inputs, config, encoded.prompt_len + t) for t, r in enumerate(kv)]
        response = tracer.lm.tokenizer.decode(trace.token_ids, skip_special_tokens=True)
        scores = metric(response, encoded.sample)
        scores.setdefault("rouge_l", max(rouge_l(response, a) for a in encoded.sample.answers))
        arrays[f"{cond}__token_id"] = np.asarray(trace.token_ids, np.int64)
        arrays[f"{cond}__open"] = opened
        results[cond] = {"response": response, "n_steps": len(trace.token_ids), **scores,
                         "kv_read": float(np.mean(kv)),  # every step that ran, the stop step included
                         "opened": [int(o.sum()) for o in opened]}
    return arrays, {"prompt_tokens": encoded.prompt_len, "conditions": results}


def decision_cost(policy: str, inputs: dict[str, Any], config: SparseConfig, n_keys: int) -> float:
    """What deciding one step reads, as a fraction of the cache of n_keys keys (added to the policy's KV read):
    `query` its far-page summaries, `predicted` and `layerwise` their probe's weights; the others nothing
    (static's ranking is a constant; the oracle's dense step is an upper bound's price, shown apart)."""
    if policy == "query":
        group = inputs["group"] if config.sparsity.unit == "kv" else 1
        return decision_read(n_keys, QUERY_PAGE, config.sparsity.sink, config.sparsity.recent, config.query_refine, group)
    probe = inputs.get({"predicted": "predictor", "layerwise": "layer_probe"}.get(policy, ""))
    return probe_read(probe, inputs["cache_per_key"] * n_keys) if probe is not None else 0.0


def step_generators(seed: int, sample_id: str) -> Callable[[int], np.random.Generator]:
    """Step t's random generator for one sample, seeded from (seed, sample id, t): the same draw whatever ran before."""
    key = zlib.crc32(sample_id.encode())
    return lambda t: np.random.default_rng([seed, key, t])


def run_sparse(lm: LoadedModel, samples: list[EncodedSample], task_config: Any, config: SparseConfig,
               out: str | Path, metric: Callable[[str, Any], dict], trace: TraceConfig = TraceConfig(),
               quiet: bool = False) -> tuple[RunDir, dict]:
    """Every sample under every policy × budget into `out` (resumable), then results/sparse.json and the figure.

    `samples` are the registered task's samples of `task_config` (its config dataclass), `metric` its answer metric.
    """
    from dynheads.report.sparse_figures import accuracy_vs_kv_read

    units = config.sparsity.units(lm.layout.n_heads, lm.layout.n_kv_heads)
    shape = (lm.layout.n_layers, units)
    bad = [k for k in config.budgets if not 1 <= k <= lm.layout.n_layers * units]
    if bad:
        raise ConfigError(f"budget {bad[0]} is outside 1..{lm.layout.n_layers * units} ({config.sparsity.unit} heads)")
    if "layerwise" in config.policies:
        config.layer_of_probe(lm.layout.n_layers)  # a probe layer the model has, before anything runs
    detection = RunDir.open(Path(config.detection).expanduser(), what="detection run")
    det_cfg = detection.config
    ids = {e.sample.id for e in samples}
    task_config = _check_disjoint(detection, task_config, ids)  # paths resolved, as the detection run stores them
    task = asdict(task_config)
    ranking, source = ranking_from_run(detection, lm.layout, task_config, ids, what="detection run")
    if config.static_ranking is not None:
        ranking, source = load_static_ranking(config.static_ranking, lm, task_config, ids, task_config, Path(out),
                                              trace, quiet)
    score_args = det_cfg["score"].get("args", {})
    score = get_score(det_cfg["score"]["name"]).with_args(**score_args)  # the oracle scores steps on the run's span
    span = score_args.get("span", "needle")
    trace = replace(trace, record_rows=False, record_hidden="predicted" in config.policies,
                    mass_spans=tuple(dict.fromkeys(score.mass_spans + (span,))))
    # the ranking's fingerprint: a resumed run whose detection folder gained samples (another ranking) is refused
    ranking_entry = {"source": source, "sha256": hashlib.sha256(np.ascontiguousarray(ranking, np.float64)).hexdigest()}
    run = RunDir.create(out, run_config("sparse", lm, config.seed, task=task, trace=trace, sparse=config,
                                        static_ranking=ranking_entry))
    inputs = {"shape": shape, "ranking": ranking, "score": score, "span": span,
              "cache_per_key": 2 * lm.layout.n_layers * lm.layout.n_kv_heads * _head_dim(lm),  # K and V elements
              "group": lm.layout.group_size}
    if "predicted" in config.policies:
        inputs["predictor"] = _predictor(detection, score, run.path / "predictor.pt", config.seed)
    tracer = Tracer(lm, trace)
    fitted = fit_in_step(tracer, detection, config, score, run.path, quiet)
    if "query" in fitted:
        inputs["thresholds"], inputs["query_scorer"] = fitted["query"]
    if "layerwise" in fitted:
        inputs["layer_probe"] = fitted["layerwise"]
    run_samples(run, samples, lambda enc: sparse_sample(tracer, enc, config, inputs, metric), len(samples), quiet)
    result = summarise(run.sample_results(), config)
    result.update(static_ranking=source, detection=str(detection.path), sparsity=asdict(config.sparsity),
                  predictor=_predictor_info(run.path / "predictor.pt"),
                  layer_probe=_predictor_info(run.path / "layer_probe.pt"),
                  query_thresholds={str(k): v for k, v in inputs.get("thresholds", {}).items()} or None)
    run.write_result("sparse", result)
    fig = accuracy_vs_kv_read(result, title=f"{Path(lm.source).name}: head-sparse decoding, {result['n_samples']} "
                              f"samples (S={config.sparsity.sink}, W={config.sparsity.recent}, {config.sparsity.unit} heads)")
    _save(fig, run.figure_path("sparse_accuracy_vs_kv"))
    return run, result


@dataclass
class InStepFit:
    """One in-step policy's fit from the detection prompts decoded all-open: what it notes at every layer of every
    step (`notes(row)` gives the sample's `note(t, layer, seen)`), and how it fits from that once the pass is done
    (`finish(rows, tokens, records, active)`: tokens = each sample's re-decoded ids, records and `active` = the
    detection run's records and their active heads by its score, read once). Several fits share one pass
    (`fit_in_step`)."""

    notes: Callable[[dict], Callable[[int, int, Any], None]]
    finish: Callable[[list[dict], dict[str, list[int]], Any, np.ndarray], Any]


def fit_in_step(tracer: Tracer, detection: RunDir, config: SparseConfig, score, folder: Path, quiet: bool = False
                ) -> dict[str, Any]:
    """The fitted state of every in-step policy in `config.policies` (query: (thresholds, scorer); layerwise: its
    probe), each loaded from `folder` when a resumed run saved it there, the others fitted on ONE all-open pass
    over the detection prompts (the pass costs as much as the detection run's decoding; the fits share it)."""
    out: dict[str, Any] = {}
    pending: dict[str, InStepFit] = {}
    if "query" in config.policies:
        path = folder / "query_thresholds.json"
        out["query"] = load_query(path, config)
        if out["query"] is None:
            pending["query"] = query_fit(tracer, detection, config, path, quiet)
    if "layerwise" in config.policies:
        path = folder / "layer_probe.pt"
        out["layerwise"] = load_layer_probe(path, config.layer_of_probe(tracer.lm.layout.n_layers))
        if out["layerwise"] is None:
            pending["layerwise"] = layer_probe_fit(tracer, detection, config, path, quiet)
    if pending:
        rows = detection.sample_results()

        def notes(row: dict):
            each = [fit.notes(row) for fit in pending.values()]
            return lambda t, layer, seen: [note(t, layer, seen) for note in each]

        tokens = detection_pass(tracer, rows, config.sparsity, notes)
        records = detection.read_records()
        active = score.active(records.array("score"))
        out.update({name: fit.finish(rows, tokens, records, active) for name, fit in pending.items()})
    return out


def load_query(path: Path, config: SparseConfig) -> tuple[dict[int, float], QueryScorer] | None:
    """The thresholds and scorer a resumed run saved at `path` (None: not fitted yet); a different refine is refused."""
    if not path.exists():
        return None
    saved = json.loads(path.read_text())
    if saved["scorer"]["refine"] != config.query_refine:
        raise ConfigError(f"{path}: fitted with --query-refine {saved['scorer']['refine']}, not "
                          f"{config.query_refine}; use another --out")
    return ({int(k): float(v) for k, v in saved["thresholds"].items()}, QueryScorer.from_json(saved["scorer"]))


def query_fit(tracer: Tracer, detection: RunDir, config: SparseConfig, path: Path, quiet: bool = False) -> InStepFit:
    """The `query` policy's scorer and its threshold per budget k, from the detection run's own prompts (never the
    evaluated ones).

    Each detection prompt is decoded with every head open (plain generation: the detection run's own tokens,
    checked) while every layer notes its units' far pulls (headsets/in_step.layer_pull, refined by the keys of
    the best pages); the labels are the detection run's D_t units at the same steps. A logistic regression
    (scikit-learn) of D_t on the unit's base rate, its pull and its pull's distance from the unit's mean gives
    the scorer (in_step.QueryScorer); k units per step on average score above the (1 - k / units) quantile of all
    scores, which is the threshold. Saved to `path` (JSON) and reused by a resumed run.
    """
    from dynheads.tracing.page_bounds import PageSummaries

    layout, sparsity = tracer.lm.layout, config.sparsity
    units = sparsity.units(layout.n_heads, layout.n_kv_heads)
    group = layout.group_size if sparsity.unit == "kv" else 1
    pulls: dict[str, list[np.ndarray]] = {}  # sample -> per step, float [layers, units]

    def notes(row: dict):
        summaries, steps = PageSummaries(QUERY_PAGE), pulls.setdefault(row["id"], [])

        def note(t: int, layer: int, seen) -> None:
            while len(steps) <= t:
                steps.append(np.full((layout.n_layers, units), -np.inf))
            steps[t][layer] = layer_pull(seen, layer, summaries, config.query_refine).reshape(-1, group).max(-1)
        return note

    def finish(rows: list[dict], tokens: dict[str, list[int]], records, active: np.ndarray
               ) -> tuple[dict[int, float], QueryScorer]:
        from sklearn.linear_model import LogisticRegression

        x, y = [], []
        for row in rows:
            mine, same = _matching_steps(records, row["id"], tokens[row["id"]])
            x += pulls[row["id"]][:same]
            y.append(active[mine][:same].reshape(same, layout.n_layers, units, group).any(-1))
        if not x:
            raise ConfigError(f"detection run {detection.path}: no decode step to calibrate the query policy on")
        x, y = np.stack(x), np.concatenate(y)
        finite = np.isfinite(x)
        mean_pull = np.where(finite, x, 0).sum(0) / np.maximum(finite.sum(0), 1)
        rate = (y.sum(0) + 0.5) / (len(y) + 1)  # the unit's share of D_t steps, smoothed
        prior = np.log(rate / (1 - rate))
        scorer = QueryScorer(prior, mean_pull, (1.0, 0.0, 0.0), 0.0, config.query_refine, QUERY_PAGE)
        if y.any() and not y.all():
            fit = LogisticRegression(max_iter=1000).fit(scorer.features(x).reshape(-1, 3), y.reshape(-1))
            scorer = replace(scorer, weights=tuple(float(w) for w in fit.coef_[0]), bias=float(fit.intercept_[0]))
        values = scorer.score(x)  # every unit at every step
        total = layout.n_layers * units
        thresholds = {k: float(np.quantile(values, 1 - k / total)) for k in config.budgets}
        path.write_text(json.dumps({"thresholds": {str(k): v for k, v in thresholds.items()}, "samples": len(rows),
                                    "steps": len(x), "scorer": scorer.to_json()}, indent=1))
        if not quiet:
            print(f"query policy fitted on {len(x)} steps of {len(rows)} detection prompts: weights (prior, pull, "
                  f"centred pull) {np.round(scorer.weights, 3).tolist()}, thresholds {thresholds}")
        return thresholds, scorer

    return InStepFit(notes, finish)


def _matching_steps(records, sample_id: str, tokens: list[int]) -> tuple[np.ndarray, int]:
    """(the sample's rows in `records`, how many of its first steps a re-decode reproduced token for token)."""
    mine = records.sample_ids == sample_id
    stored = records.array("token_id")[mine]
    n = min(len(stored), len(tokens))
    return mine, int(np.argmin(np.r_[np.asarray(tokens[:n]) == stored[:n], False]))


def load_layer_probe(path: Path, layer: int):
    """The ridge probe after `layer` a resumed run saved at `path` (None: not fitted yet); another one is refused."""
    from dynheads.analyses.probes import Probe

    if not path.exists():
        return None
    probe = Probe.load(path)
    if int(probe.meta.get("layer", -1)) == layer and probe.meta.get("fit") == "ridge":
        return probe
    raise ConfigError(f"{path}: a probe fitted after layer {probe.meta.get('layer')} by "
                      f"{probe.meta.get('fit', 'gradient descent')}, not the ridge probe after --probe-layer "
                      f"{layer}; use another --out")


def layer_probe_fit(tracer: Tracer, detection: RunDir, config: SparseConfig, path: Path, quiet: bool = False
                    ) -> InStepFit:
    """The `layerwise` policy's probe: residual after layer l at step n → the heads above l active at step n.

    The detection prompts are decoded again with every head open (plain generation: the detection run's own
    tokens, checked) while layer l + 1's attention input is noted at every step; the labels are the detection
    run's active heads (its registered score) at the same steps, as 0/1. A linear probe (cheap enough to run
    inside every step) regresses them in closed form (probes.fit_ridge_probe: ridge, penalty chosen on held-out
    samples), a linear probability model whose outputs estimate P(active) on one scale for every head, so the
    top k across heads respects how often each head retrieves. (Gradient-trained linear probes stopped early —
    ASL classification, or MSE — kept outputs near their random initialisation, which ranked heads across
    layers almost at random: 0.00 accuracy at k = 8 and 16 on 1K single needles where static answers 0.03 and
    0.47; README.) Split by sample, saved to `path` and reused
    by a resumed run with the same layer.
    """
    layer = config.layer_of_probe(tracer.lm.layout.n_layers)
    taken: dict[str, list[np.ndarray]] = {}

    def notes(row: dict):
        seen_steps = taken.setdefault(row["id"], [])

        def note(t: int, at: int, seen) -> None:
            if at == layer + 1:
                seen_steps.append(seen.residual[0].float().cpu().numpy())
        return note

    def finish(rows: list[dict], tokens: dict[str, list[int]], records, active: np.ndarray):
        from dynheads.analyses.probes import fit_ridge_probe

        x, y, ids = [], [], []
        for row in rows:
            sid = row["id"]
            mine, same = _matching_steps(records, sid, tokens[sid])
            x += taken[sid][:same]
            y.append(active[mine][:same, layer + 1:].astype(np.float32))
            ids += [sid] * same
        if not x:
            raise ConfigError(f"detection run {detection.path}: no decode step to fit the layerwise probe on")
        probe = fit_ridge_probe(np.stack(x), np.concatenate(y), np.asarray(ids), np.random.default_rng(config.seed),
                                meta={"detection": str(detection.path), "layer": layer, "steps": len(x),
                                      "samples": len(rows)})
        probe.save(path)
        if not quiet:
            print(f"layerwise probe fitted after layer {layer} on {len(x)} steps of {len(rows)} detection prompts")
        return probe

    return InStepFit(notes, finish)


def detection_pass(tracer: Tracer, rows: list[dict], sparsity: Sparsity, notes) -> dict[str, list[int]]:
    """Decode each stored detection sample with every head open (plain generation), calling
    `notes(row)(t, layer, seen)` at every layer of every step; returns each sample's generated token ids."""
    from dynheads.tasks.base import encode_stored

    layout = tracer.lm.layout
    units = sparsity.units(layout.n_heads, layout.n_kv_heads)
    out = {}
    for row in rows:
        encoded = encode_stored(row, tracer.lm.tokenizer)
        note = notes(row)

        def policy(t, previous, full):
            def decide(layer: int, seen) -> np.ndarray:
                note(t, layer, seen)
                return np.ones(units, bool)  # every head open: the prompt decodes as plain generation
            return decide

        state = tracer.prefill(encoded.input_ids, encoded.token_spans)
        out[row["id"]] = list(tracer.generate(state, heads=policy, sparsity=sparsity, fork=False).token_ids)
    return out


def summarise(rows: list[dict], config: SparseConfig) -> dict:
    """Per condition: mean and 95% bootstrap CI of accuracy, ROUGE-L, KV read and units open per step; each
    deployable dynamic policy (and the oracle) − static."""

    def rng(key: str) -> np.random.Generator:  # one generator per interval and test: adding one moves no other
        return sample_rng(config.seed, f"sparse-stats/{key}")

    per = {c: {m: np.array([r["conditions"][c][m] for r in rows], float) for m in METRICS + ("f1",)
               if m in rows[0]["conditions"][c]} for c, _, _ in conditions(config)}
    for c, _, _ in conditions(config):  # the real budget: units open per step, averaged within each sample
        if all("opened" in r["conditions"][c] for r in rows):
            per[c]["open_units"] = np.array([np.mean(r["conditions"][c]["opened"] or [0]) for r in rows], float)
    conds = {c: {"policy": p, "budget": k, **{m: asdict(bootstrap_ci(v, rng(f"{c}/{m}"), config.n_boot)) for m, v in per[c].items()}}
             for c, p, k in conditions(config)}
    tests = []
    # predicted − static answers the question; oracle − static is the headroom any dynamic policy has there.
    for policy in (*DEPLOYABLE, "oracle"):
        if {policy, "static"} <= set(config.policies):
            for k in config.budgets:
                for m in ("accuracy", "rouge_l"):
                    diff = paired_difference(per[f"{policy}@{k}"][m], per[f"static@{k}"][m],
                                             rng(f"{policy}@{k}-static@{k}/{m}"), config.n_boot)
                    tests.append({"a": f"{policy}@{k}", "b": f"static@{k}", "budget": k, "metric": m, **asdict(diff)})
    closed = gap_closed(conds, config)
    oracle_above = {t["budget"] for t in tests
                    if t["a"].startswith("oracle@") and t["metric"] == "accuracy" and paired_verdict(t).outcome == ABOVE}
    return {"n_samples": len(rows), "conditions": conds, "comparisons": tests, "gap_closed": closed,
            # per gap_closed entry: is the oracle − static gap it divides by itself shown (else the share is noise)
            "gap_shown": {c: int(c.rsplit("@", 1)[1]) in oracle_above for c in closed},
            "verdict": verdict([t for t in tests if t["a"].startswith("predicted@")]),
            "verdicts": {p: verdict([t for t in tests if t["a"].startswith(f"{p}@")], p)
                         for p in DEPLOYABLE if {p, "static"} <= set(config.policies)}}


def gap_closed(conds: dict, config: SparseConfig) -> dict[str, float | None]:
    """Per budget, the fraction of the oracle − static accuracy gap a deployable dynamic policy closes:
    (policy − static) / (oracle − static); None where the oracle is not above static."""
    out: dict[str, float | None] = {}
    for policy in DEPLOYABLE:
        if {policy, "static", "oracle"} <= set(config.policies):
            for k in config.budgets:
                acc = {p: conds[f"{p}@{k}"]["accuracy"]["estimate"] for p in (policy, "static", "oracle")}
                gap = acc["oracle"] - acc["static"]
                out[f"{policy}@{k}"] = (acc[policy] - acc["static"]) / gap if gap > 0 else None
    return out


def verdict(tests: list[dict], policy: str = "predicted") -> str:
    """The answer to 'does `policy` beat static at equal budget, and from which budget on' (accuracy).

    A budget is a win (a loss) when the paired accuracy difference is shown above (below) zero by the
    rule every paired verdict uses (`stats.paired_verdict`: 95% bootstrap interval, Wilcoxon p < 0.05,
    at least MIN_PAIRS samples): the interval alone calls a single lucky sample a win.
    """
    acc = sorted((t for t in tests if t["metric"] == "accuracy"), key=lambda t: t["budget"])
    if not acc:
        return f"{policy} vs static not compared (both policies are needed)"
    calls = [paired_verdict(t) for t in acc]
    if not all(c.comparable for c in calls):
        return f"not comparable: {next(c for c in calls if not c.comparable).too_few('samples')}"
    rule = (f"95% CI of the paired accuracy difference above 0, Wilcoxon p < {ALPHA:g} and at least "
            f"{MIN_PAIRS} samples")
    wins = [t["budget"] for t, c in zip(acc, calls) if c.outcome == ABOVE]
    losses = [t["budget"] for t, c in zip(acc, calls) if c.outcome == BELOW]
    if not wins:
        return (f"{policy} does not beat static at any budget (needs {rule})"
                + (f"; static is better at k = {losses}" if losses else ""))
    from_k = next((t["budget"] for i, t in enumerate(acc) if all(c.outcome == ABOVE for c in calls[i:])), None)
    tail = f", at every budget from k = {from_k} on" if from_k is not None else ""
    return f"{policy} beats static at k = {wins} ({rule}){tail}"


# --- internals -----------------------------------------------------------------------------
def _check_disjoint(detection: RunDir, task_config: Any, ids: set[str]) -> Any:
    """Refuse a detection run that traced any of the evaluated samples (same sample id from the same source);
    returns the task config with its paths resolved (its input files are hashed once, here).

    The source is the task config without its grid, with each input file compared by resolved path *or*
    content hash (a relative or copied path to the same data is the same source); whenever the source is
    the same, the sample ids are compared.
    """
    resolved, files = _task_of(task_config).inputs(task_config)
    det_task, det_files = detection.config.get("task", {}), detection.config.get("inputs") or {}
    ours = {k: v for k, v in json.loads(json.dumps(asdict(resolved))).items() if k not in _GRID_KEYS and k not in files}
    theirs = {k: v for k, v in det_task.items() if k not in _GRID_KEYS and k not in files}
    same_files = set(files) == set(det_files) and all(_same_input(files[k], det_files[k]) for k in files)
    shared = sorted(detection.done_samples() & ids) if same_files and ours == theirs else []
    if shared:
        raise ConfigError(f"detection run {detection.path} traced evaluated sample {shared[0]} "
                          "(same task source); use a detection run with another --seed or other data")
    return resolved


def _same_input(a: dict | None, b: dict | None) -> bool:
    """Two input fingerprints ({path, sha256}, or None for a built-in default) name the same data."""
    if not a or not b:
        return a == b
    return a.get("path") == b.get("path") or a.get("sha256") == b.get("sha256")


def _task_of(task_config: Any):
    """The registered task whose config class `task_config` is."""
    from dynheads.tasks.base import get_task, tasks

    found = [get_task(name) for name in tasks.names() if isinstance(task_config, get_task(name).config)]
    if not found:
        raise ConfigError(f"no registered task takes a {type(task_config).__name__}")
    return found[0]


def _predictor(detection: RunDir, score, path: Path, seed: int):
    """The probe of the predicted policy: loaded from `path` when a previous run saved it, else fitted and saved."""
    from dynheads.analyses.probes import Probe, ProbeConfig, fit_probe

    if path.exists():
        return Probe.load(path)
    records = detection.read_records()
    # labels = the score's own activity rule (score.active), as 0/1 with threshold 0.5, so the probe's
    # "score > threshold" matches it whatever comparison the registered score uses
    active = score.active(records.array("score")).astype(np.float32)
    config = ProbeConfig(offset=1, active_threshold=0.5, seed=seed)
    probe = fit_probe(records.hidden(), active, records.sample_ids, records.step, config,
                      np.random.default_rng(seed), meta={"detection": str(detection.path)})
    probe.save(path)
    return probe


def _head_dim(lm: LoadedModel) -> int:
    """Channels per key (the config's head_dim, else hidden size / query heads)."""
    cfg = lm.model.config
    cfg = getattr(cfg, "text_config", None) or cfg
    return int(getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads)


def _predictor_info(path: Path) -> dict | None:
    info = path.with_name(path.name + ".json")
    return {"path": str(path), **json.loads(info.read_text())["meta"]} if info.exists() else None


def _save(fig, path: Path) -> None:
    import matplotlib.pyplot as plt

    fig.savefig(path, dpi=150, bbox_inches="tight")
    plt.close(fig)
