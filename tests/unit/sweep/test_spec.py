"""Sweep SPECs: cells (folder names, seeds, grids) and one-line errors for bad specs."""
import pytest

from dynheads.errors import ConfigError
from dynheads.sweep.spec import ModelSpec, cells_of, load_spec


def test_cells_cross_models_grid_and_seeds_with_deterministic_names():
    raw = {"models": ["default", {"source": "/m/llama-7b", "dtype": "bfloat16", "device_map": {"model": 0}}],
           "seeds": [0, 1],
           "experiments": [{"name": "niah", "lengths": [1000], "depths": [0, 100], "grid": {"max_new_tokens": [16, 32]}},
                           {"name": "multihop", "data": "q.json", "limit": 5}]}
    cells = cells_of(raw)
    assert [c.name for c in cells] == [
        "niah__default__max_new_tokens=16__seed0", "niah__default__max_new_tokens=16__seed1",
        "niah__default__max_new_tokens=32__seed0", "niah__default__max_new_tokens=32__seed1",
        "multihop__default",  # multihop takes no seed: one cell, no seed suffix
        "niah__llama-7b__max_new_tokens=16__seed0", "niah__llama-7b__max_new_tokens=16__seed1",
        "niah__llama-7b__max_new_tokens=32__seed0", "niah__llama-7b__max_new_tokens=32__seed1",
        "multihop__llama-7b"]
    assert cells[1].params == {"lengths": [1000], "depths": [0, 100], "max_new_tokens": 16, "seed": 1}
    assert cells[4].params == {"data": "q.json", "limit": 5}
    assert cells[5].model == ModelSpec("/m/llama-7b", dtype="bfloat16", device_map='{"model": 0}')
    assert cells_of(raw) == cells  # the same spec names the same folders on a rerun


def test_smoke_example_is_four_niah_samples_at_1k(tmp_path):
    from pathlib import Path

    cells = load_spec(Path(__file__).resolve().parents[3] / "examples" / "sweep-smoke.toml")
    n = 0
    for c in cells:
        assert c.experiment == "niah" and c.model.source == "default" and set(c.params["lengths"]) == {1000}
        n += len(c.params["lengths"]) * len(c.params["depths"]) * c.params.get("samples_per_cell", 2)
    assert n == 4


@pytest.mark.parametrize("raw, message", [
    ({"experiments": []}, "no [[experiments]]"),
    ({"model": ["default"], "experiments": [{"name": "niah"}]}, "unknown key 'model'"),
    ({"experiments": [{"name": "nope"}]}, "unknown experiment 'nope'"),
    ({"experiments": [{"name": "niah", "length": [1000]}]}, "unknown parameter 'length'"),
    ({"experiments": [{"name": "niah", "seed": 3}]}, "not 'seed'"),
    ({"experiments": [{"name": "niah", "grid": {"depths": []}}]}, "non-empty list"),
    ({"experiments": [{"name": "niah", "depths": [0], "grid": {"depths": [[0]]}}]}, "both fixed and in the grid"),
    ({"experiments": [{"name": "niah"}, {"name": "niah", "depths": [50]}]}, "give the experiments a 'label'"),
    ({"seeds": ["a"], "experiments": [{"name": "niah"}]}, "list of integers"),
    ({"models": [{"path": "x"}], "experiments": [{"name": "niah"}]}, "table with 'source'"),
    ({"experiments": [{"name": "niah", "grid": {"max_new_tokens": ["many", "more"]}}]},
     "experiment 'niah': grid: 'max_new_tokens' expects an integer, got 'many'"),
    ({"experiments": [{"name": "niah", "samples_per_cell": "two"}]}, "'samples_per_cell' expects an integer, got 'two'"),
    ({"experiments": [{"name": "niah", "samples_per_cell": True}]}, "'samples_per_cell' expects an integer, got True"),
    ({"experiments": [{"name": "niah", "haystack": 3}]}, "'haystack' expects a string, got 3"),
    ({"experiments": [{"name": "niah", "lengths": {"a": 1}}]}, "'lengths' expects a non-empty list of values"),
    ({"experiments": [{"name": "rag", "data": "q.json", "rind_threshold": "high"}]},
     "'rind_threshold' expects a number, got 'high'"),
])
def test_bad_specs_are_one_line_config_errors(raw, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("(", r"\(")):
        cells_of(raw)


def test_values_of_the_parameters_types_pass():
    raw = {"experiments": [{"name": "rag", "data": "q.json", "limit": 5, "rind_threshold": 1, "heads": "dynamic,static",
                            "grid": {"top_k": [5, 10]}},
                           {"name": "ablate", "lengths": "1000,2000", "depths": [0, 12.5], "random_per_step": True}]}
    assert [c.params for c in cells_of(raw)][-1] == {"lengths": "1000,2000", "depths": [0, 12.5],
                                                    "random_per_step": True, "seed": 0}


def test_a_folder_given_as_the_spec_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="is a folder; give the TOML file"):
        load_spec(tmp_path)


def test_an_unreachable_ray_address_fails_in_seconds_before_ray_loads():
    import socket
    import time

    from dynheads.sweep.run import check_ray_address

    with socket.socket() as s:  # a port that was just free: nothing listens there
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    started = time.monotonic()
    with pytest.raises(ConfigError, match=f"--ray 127.0.0.1:{port}: no Ray head reachable within 5 s"):
        check_ray_address(f"127.0.0.1:{port}")
    assert time.monotonic() - started < 5
    with pytest.raises(ConfigError, match="give the HOST:PORT of a Ray head"):
        check_ray_address("headnode")
    with socket.socket() as s:  # something listens: the probe passes (Ray's own handshake follows)
        s.bind(("127.0.0.1", 0))
        s.listen()
        check_ray_address(f"ray://127.0.0.1:{s.getsockname()[1]}")
    check_ray_address(None)  # a local instance: nothing to probe


def test_labels_separate_two_runs_of_one_command_and_bad_toml_names_the_file(tmp_path):
    raw = {"experiments": [{"name": "niah"}, {"name": "niah", "label": "niah-mid", "depths": [50]}]}
    assert [c.name for c in cells_of(raw)] == ["niah__default__seed0", "niah-mid__default__seed0"]
    bad = tmp_path / "bad.toml"
    bad.write_text("models = [")
    with pytest.raises(ConfigError, match="bad.toml is not valid TOML"):
        load_spec(bad)


def test_cells_are_checked_before_any_model_loads():
    from dynheads.sweep.run import check_cells

    cells = cells_of({"experiments": [{"name": "niah", "depths": [0, 150]}]})
    with pytest.raises(ConfigError, match="sweep cell niah__default__seed0: depth 150 is outside 0-100"):
        check_cells(cells)


def test_ray_flag_takes_an_optional_address():
    from dynheads.cli.sweep import _ray_flag

    assert _ray_flag([]) == (None, False)
    assert _ray_flag(["--ray"]) == (None, True)
    assert _ray_flag(["--ray", "10.0.0.1:6379"]) == ("10.0.0.1:6379", True)
    assert _ray_flag(["--ray=auto"]) == ("auto", True)
    with pytest.raises(ConfigError, match="unexpected argument '--rya'"):
        _ray_flag(["--rya"])
