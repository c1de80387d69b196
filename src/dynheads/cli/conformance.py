"""`dynheads conformance`: the architecture support table (exact / refused and why), computed here."""
from __future__ import annotations

import json
from pathlib import Path

import typer


def register(app: typer.Typer) -> None:
    @app.command()
    def conformance(
        family: list[str] = typer.Option(None, "--family", help="model type(s) to check (repeatable)"),
        all_families: bool = typer.Option(False, "--all", help="every causal-LM model type of the installed "
                                          "transformers (slow), instead of the README's families"),
        json_out: Path = typer.Option(None, "--json", help="also write the results as JSON here"),
    ):
        """Trace a tiny random model of each family and compare it with generate and eager attentions."""
        import logging
        import warnings

        from dynheads.conformance import FAMILIES, causal_lm_families, check_family, support_table
        from dynheads.errors import ConfigError

        warnings.filterwarnings("ignore")
        logging.getLogger("transformers").setLevel(logging.ERROR)
        known = causal_lm_families()
        unknown = [name for name in family or () if name not in known]
        if unknown:
            import transformers

            raise ConfigError(f"unknown --family '{unknown[0]}': not a causal-LM model type of the installed "
                              f"transformers {transformers.__version__} (e.g. {', '.join(list(FAMILIES)[:4])}; "
                              "`dynheads conformance --all` checks every one)")
        if json_out is not None:
            from dynheads.runs import check_out_file

            check_out_file(json_out, "--json")
        names = family or (known if all_families else list(FAMILIES))
        results = [check_family(name) for name in names]
        typer.echo(support_table(results))
        if json_out is not None:
            json_out.write_text(json.dumps([r.as_dict() for r in results], indent=2))
