"""Old import paths: `dynheads.experiments.<name>` is the module under its new home (runners/ or analyses/).

Before the runners/analyses split every experiment lived here. `import dynheads.experiments.probes` (or
`from dynheads.experiments.trace import run_niah`) still works: it returns the very module object of
`dynheads.analyses.probes`, imported on first use, so nothing is loaded twice and no registry is doubled.
New code imports from runners/ (needs the model) and analyses/ (reads run folders).
"""
from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys

MOVED = {
    **{name: f"dynheads.runners.{name}" for name in ("trace", "ablation", "progressive", "sparse", "rag", "reproduce")},
    **{name: f"dynheads.analyses.{name}" for name in ("dynamism", "hybrid", "needles", "cca", "probes", "probe_table",
                                                        "probe_baselines", "stats", "head_export")},
    "static_ranking": "dynheads.runners.detection",  # load_static_ranking, and ranking_from_* re-exported there
}


class _Alias(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Finds `dynheads.experiments.<old>` and loads it as the module it moved to."""

    def find_spec(self, fullname, path=None, target=None):
        package, _, name = fullname.rpartition(".")
        if package != __name__ or name not in MOVED:
            return None
        return importlib.util.spec_from_loader(fullname, self)

    def create_module(self, spec):
        module = importlib.import_module(MOVED[spec.name.rpartition(".")[2]])
        spec.loader_state = module.__spec__  # the import sets the alias spec on the module; exec_module restores it
        return module

    def exec_module(self, module):
        module.__spec__ = module.__spec__.loader_state


def __getattr__(name: str):
    """`from dynheads.experiments import dynamism` and `dynheads.experiments.dynamism` for the moved modules."""
    if name not in MOVED:
        raise AttributeError(f"module '{__name__}' has no attribute '{name}'")
    return importlib.import_module(f"{__name__}.{name}")


if not any(isinstance(f, _Alias) for f in sys.meta_path):
    sys.meta_path.append(_Alias())
