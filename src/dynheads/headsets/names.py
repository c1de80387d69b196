"""Each command's names for head sets (the CLI values they always had), mapped onto the one registry.

`ablate` conditions, `rag --heads` strategies and `sparse --policies` keep their names; each name is a
`Spec` of a registered head set (builtin.py) with the arguments that make it what the command means, so
no behaviour lives here. `dynheads list heads` shows every head set with these names beside it; the old
`dynheads list selectors | strategies | policies` list one command's names.
"""
from __future__ import annotations

from dynheads.registry import Registry, Spec


def _table(kind: str, names: dict[str, Spec]) -> Registry[Spec]:
    table: Registry[Spec] = Registry(kind)
    for name, spec in names.items():
        table.register(name)(spec)
    return table


# `dynheads ablate` / `ablate-progressive` conditions (none = the unmasked run; progressive = Fig. 3)
ABLATION = _table("ablation condition", {
    "none": Spec("none"),
    "dynamic": Spec("dynamic"),
    "static": Spec("static"),
    "static_excluding_dynamic": Spec("static_excluding_dynamic"),
    "random": Spec("random"),  # per_step from --random-per-step
    "progressive": Spec("progressive"),
})
# `dynheads rag --heads` (paper Sec. 5, Table 4; `full` is our upper bound)
RAG = _table("head strategy", {
    "dynamic": Spec("predicted", {"source": "current"}),
    "static": Spec("static"),
    "dynamic-random": Spec("random", {"per_step": True}),
    "fixed-random": Spec("random", {"per_step": False}),
    "none": Spec("none"),
    "full": Spec("all"),
})
# `dynheads sparse --policies`
SPARSE = _table("head policy", {
    "full": Spec("all"),
    "streaming": Spec("none"),
    "static": Spec("static"),
    "random": Spec("random", {"per_step": True}),
    "oracle": Spec("oracle"),
    "predicted": Spec("predicted", {"source": "previous"}),
    "query": Spec("query"),  # decides inside the step; its threshold is calibrated per budget (runners/sparse.py)
    "layerwise": Spec("layerwise"),  # decides inside the step from a probe on an early layer's residual stream
})
COMMANDS = {"ablate": ABLATION, "rag --heads": RAG, "sparse --policies": SPARSE}


def aliases(head_set: str) -> list[str]:
    """`command: name` for every command name that means this head set (with its arguments)."""
    out = []
    for command, table in COMMANDS.items():
        for name in table.names():
            spec = table.get(name)
            if spec.name == head_set:
                args = ", ".join(f"{k}={v}" for k, v in spec.args.items())
                out.append(f"{command} {name}" + (f" ({args})" if args else ""))
    return out
