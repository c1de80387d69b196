"""A verdict per claim, computed from the collected numbers by the rules written in the README.

Each claim first checks that the comparison is meaningful (the model does the task: NIAH accuracy,
or full-context EM for Dynamic RAG; enough samples or pairs); if not, the verdict is "not comparable"
with the number that says why. Otherwise every check must pass for "reproduced"; the first failing
check is the reason. Paired comparisons (claim 2, Dynamic RAG) go through the one rule of
`stats.paired_verdict` (interval excludes zero, Wilcoxon p < 0.05, at least `MIN_PAIRS` pairs).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from dynheads.experiments.stats import ABOVE, BELOW, MIN_PAIRS, paired_verdict

MIN_TASK_ACCURACY = 0.5  # below this the model does not do the task the claim is about
MIN_FULL_CONTEXT_EM = 0.2  # Dynamic RAG: the paper's weakest "w/o RAG" row is 0.17 EM
NEAR_ZERO = 0.1  # "accuracy ~0" in Fig. 2 / Fig. 3
J_STATIC_MAX = 0.5  # Table 1: "only a small part of the static set is active at any step" (paper 0.18-0.46)
J_ADJ_MAX = 0.6  # Table 1: "the active set turns over quickly" (paper 0.28-0.51)
# Fewest NIAH samples behind a claim-1 or claim-3 verdict; below, "not comparable: n = …". One principle
# with the paired rule: no interval a verdict reads is a bootstrap over fewer than MIN_PAIRS units.
MIN_CLAIM1_SAMPLES = MIN_PAIRS  # Table 1's intervals resample the run's samples
MIN_CLAIM3_SAMPLES = 10 * MIN_PAIRS  # the k = 0 probe is tested on 10% of the samples (split 70/20/10)

REPRODUCED, NOT_REPRODUCED, NOT_COMPARABLE = "reproduced", "not reproduced", "not comparable"


@dataclass
class Verdict:
    claim: str
    verdict: str
    reason: str
    checks: list[tuple[str, bool]] = field(default_factory=list)  # (what was checked, passed)


def all_verdicts(data: dict[str, Any]) -> list[Verdict]:
    return [claim1(data), claim2(data), claim3(data), rag(data)]


def claim1(data: dict[str, Any]) -> Verdict:
    name = "Claim 1 (dynamism, Table 1)"
    dyn, ci, rows = data["niah"]["dynamism"], data["niah"]["table1_ci"], data["niah"]["samples"]
    if not dyn or not rows:
        return Verdict(name, NOT_COMPARABLE, _missing(data, "dynamism"))
    if len(rows) < MIN_CLAIM1_SAMPLES:
        return Verdict(name, NOT_COMPARABLE, _too_few(len(rows), MIN_CLAIM1_SAMPLES, "claim 1"))
    acc = _mean([r["accuracy"] for r in rows])
    if acc < MIN_TASK_ACCURACY:
        return Verdict(name, NOT_COMPARABLE, f"the model answers only {acc:.2f} of NIAH samples")
    s = dyn["stats"]
    checks = [
        (f"Jaccard with static top-{len(s['static_heads'])}: upper 95% bound {ci['jaccard_static'][1]:.3f} "
         f"(must be < {J_STATIC_MAX})", ci["jaccard_static"][1] < J_STATIC_MAX),
        (f"adjacent Jaccard: upper 95% bound {ci['adjacent_jaccard'][1]:.3f} (must be < {J_ADJ_MAX})",
         ci["adjacent_jaccard"][1] < J_ADJ_MAX),
        (f"entropy {s['entropy']:.3f} (must be > ln {len(s['static_heads'])} = {s['ln_static_top']:.3f}: "
         "more heads share the work than the static set holds)", s["entropy"] > s["ln_static_top"]),
    ]
    return _decide(name, checks)


def claim2(data: dict[str, Any]) -> Verdict:
    name = "Claim 2 (irreplaceability, Fig. 2)"
    res = data["ablation"]["result"]
    if not res:
        return Verdict(name, NOT_COMPARABLE, _missing(data, "ablation"))
    conds = res["conditions"]
    base = conds["none"]["accuracy"]["estimate"]
    if base < MIN_TASK_ACCURACY:
        return Verdict(name, NOT_COMPARABLE, f"the unmasked model answers only {base:.2f} of NIAH samples")
    tests = {(t["a"], t["b"]): t for t in res["comparisons"] if t["metric"] == "accuracy"}
    dyn = conds["dynamic"]["accuracy"]
    checks = [(f"dynamic-masked accuracy: upper 95% bound {dyn['high']:.2f} (must be ≤ {NEAR_ZERO})",
               dyn["high"] <= NEAR_ZERO)]
    for other in ("static_excluding_dynamic", "random"):
        t = tests.get(("dynamic", other))
        if t:
            paired = paired_verdict(t)
            if not paired.comparable:
                return Verdict(name, NOT_COMPARABLE, paired.too_few("samples"))
            checks.append((f"dynamic − {other} accuracy {paired.summary} (must be below zero: interval and "
                           "Wilcoxon)", paired.outcome == BELOW))
    return _decide(name, checks)


def claim3(data: dict[str, Any]) -> Verdict:
    name = "Claim 3 (correlation, Fig. 4, Table 2)"
    cca, probe = data["niah"]["cca"], data["niah"]["probes"].get(0) or data["niah"]["probes"].get("0")
    if not cca or not probe:
        return Verdict(name, NOT_COMPARABLE, _missing(data, "cca" if not cca else "probe_k0"))
    n = len(data["niah"]["samples"])
    if n < MIN_CLAIM3_SAMPLES:
        return Verdict(name, NOT_COMPARABLE, _too_few(n, MIN_CLAIM3_SAMPLES, "claim 3"))
    checks = []
    by_k = {o["k"]: o for o in cca["offsets"]}
    for k in (0, 1):
        o = by_k.get(k)
        if o is None:
            continue
        lo = o["heldout_top1_ci"]["low"]
        checks.append((f"k={k}: held-out top-1 lower 95% bound {_f(lo)} (must be > null {o['null']['top1']:.3f})",
                       lo is not None and lo > o["null"]["top1"]))
        for ctrl in ("persistence", "position"):
            g = o[f"margin_over_{ctrl}"]
            checks.append((f"k={k}: hidden − {ctrl} {_f(g['gap'])} [{_f(g['low'])}, {_f(g['high'])}] (must be above zero)",
                           bool(g["excludes_zero"])))
    for base, g in probe["gaps"].items():
        if base == "linear probe":  # the same information read linearly: reported, not a control
            continue
        checks.append((f"probe (k=0) F1 − {base} {_f(g['gap'])} [{_f(g['low'])}, {_f(g['high'])}] (must be above zero)",
                       bool(g["excludes_zero"])))
    return _decide(name, checks)


def rag(data: dict[str, Any]) -> Verdict:
    name = "Dynamic RAG (Table 4)"
    res = data["rag"]["result"]
    if not res:
        return Verdict(name, NOT_COMPARABLE, _missing(data, "rag"))
    strat = res["strategies"]
    if "full" in strat and strat["full"]["em"]["estimate"] < MIN_FULL_CONTEXT_EM:
        return Verdict(name, NOT_COMPARABLE, f"the model answers EM {strat['full']['em']['estimate']:.2f} even with "
                       "the full context visible")
    if "dynamic" not in strat or "static" not in strat:
        return Verdict(name, NOT_COMPARABLE, "the run lacks the dynamic or static strategy")
    paired = paired_verdict(res["vs_static"]["dynamic"]["f1"])
    if not paired.comparable:
        return Verdict(name, NOT_COMPARABLE, paired.too_few("questions"))
    checks = [(f"dynamic − static F1 {paired.summary} (must be above zero: interval and Wilcoxon)",
               paired.outcome == ABOVE)]
    if "none" in strat:
        gap = strat["dynamic"]["f1"]["estimate"] - strat["none"]["f1"]["estimate"]
        checks.append((f"dynamic F1 − w/o RAG {gap:+.3f} (must be above zero)", gap > 0))
    return _decide(name, checks)


def _decide(name: str, checks: list[tuple[str, bool]]) -> Verdict:
    failed = [c for c, ok in checks if not ok]
    if not checks:
        return Verdict(name, NOT_COMPARABLE, "no statistic to check")
    if failed:
        return Verdict(name, NOT_REPRODUCED, "check failed: " + failed[0], checks)
    return Verdict(name, REPRODUCED, f"all {len(checks)} checks pass", checks)


def _too_few(n: int, minimum: int, claim: str) -> str:
    return f"n = {n} NIAH samples, fewer than the {minimum} {claim} needs"


def _missing(data: dict[str, Any], step: str) -> str:
    entry = data["state"]["steps"].get(step, {})
    if entry.get("status") == "skipped":
        return f"step '{step}' was skipped: {entry.get('reason', '')}"
    return f"step '{step}' has no result yet"


def _mean(values) -> float:
    values = list(values)
    return sum(values) / len(values) if values else math.nan


def _f(v) -> str:
    return "–" if v is None else f"{v:.3f}"
