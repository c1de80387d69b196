"""The folder layout is the data flow: imports go one way, and the old `dynheads.experiments` paths still work."""
import ast
import importlib
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "src" / "dynheads"
UPSTREAM = ("tasks", "tracing", "scores", "headsets", "rag", "analyses")  # what a runner builds on; needs no runner


def _imports(path: Path) -> set[str]:
    """Every dynheads module a file imports, at any depth (lazy imports inside functions included)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("dynheads"):
            out.add(node.module)
            out.update(f"{node.module}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.startswith("dynheads"))
    return out


def _files(folder: str = "") -> list[Path]:
    return sorted((PACKAGE / folder).rglob("*.py"))


def test_only_the_command_line_imports_the_command_line():
    outside = [p for p in _files() if "cli" not in p.relative_to(PACKAGE).parts and p.name != "__main__.py"]
    bad = {str(p.relative_to(PACKAGE)): sorted(m for m in _imports(p) if m.startswith("dynheads.cli"))
           for p in outside}
    assert {k: v for k, v in bad.items() if v} == {}
    assert "commands.py" in {p.name for p in outside}


@pytest.mark.parametrize("folder", UPSTREAM)
def test_upstream_folders_import_no_runner_and_no_command(folder):
    bad = {str(p.relative_to(PACKAGE)): sorted(m for m in _imports(p)
                                               if m.startswith(("dynheads.runners", "dynheads.commands")))
           for p in _files(folder)}
    assert {k: v for k, v in bad.items() if v} == {}


def test_old_experiment_paths_are_the_moved_modules():
    import dynheads.analyses.probes
    import dynheads.runners.detection
    import dynheads.runners.trace
    from dynheads.experiments import dynamism
    from dynheads.experiments.probes import Probe  # the README's import before the split
    from dynheads.experiments.static_ranking import load_static_ranking, ranking_from_run

    assert sys.modules["dynheads.experiments.probes"] is dynheads.analyses.probes
    assert Probe is dynheads.analyses.probes.Probe and dynamism.__name__ == "dynheads.analyses.dynamism"
    assert dynheads.analyses.probes.__spec__.name == "dynheads.analyses.probes"  # the alias leaves its spec alone
    assert load_static_ranking is dynheads.runners.detection.load_static_ranking
    assert ranking_from_run.__module__ == "dynheads.analyses.rankings"
    assert importlib.import_module("dynheads.experiments.trace").run_niah is dynheads.runners.trace.run_niah
    with pytest.raises(ModuleNotFoundError):
        importlib.import_module("dynheads.experiments.head_policies")  # replaced by headsets/, not aliased
