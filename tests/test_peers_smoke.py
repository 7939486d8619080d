"""Smoke test of benchmarks/peers.py: a tiny model, three methods, every output written."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pandas as pd
import pytest

PEERS = Path(__file__).resolve().parent.parent / "benchmarks" / "peers.py"


@pytest.fixture(scope="module")
def peers():
    spec = importlib.util.spec_from_file_location("peers", PEERS)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    # Registered before it runs: its dataclasses look their module up by name.
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_peers_writes_a_frontier_for_each_method(peers, tmp_path, capsys):
    code = peers.main([
        "--models", "vit_tiny_test", "--methods", "eager", "checkpoint", "monet",
        "--repeats", "1", "--time-limit", "2", "--output-dir", str(tmp_path),
    ])
    assert code == 0
    rows = pd.read_csv(tmp_path / "frontier.csv")
    assert set(rows["method"]) == {"eager", "checkpoint", "monet"}
    assert set(rows.loc[rows["method"] == "checkpoint", "setting"]) == {
        "every block", "every 2nd block",
    }
    # One row per budget, feasible or not, and one at the least peak found.
    assert (rows["method"] == "monet").sum() == 5
    assert "least peak" in set(rows["setting"])
    eager = rows[rows["method"] == "eager"].iloc[0]
    assert eager["peak_over_eager"] == 1.0 and eager["overhead"] == 1.0
    measured = rows[rows["peak_bytes"].notna()]
    assert measured["grads_equal"].all()
    assert measured["memory_method"].str.contains("profiler").all()
    for name in ("frontier_vit_tiny_test.png", "timeline_vit_tiny_test.png",
                 "summary.md", "report.md"):
        assert (tmp_path / name).stat().st_size > 0
    assert "monet" in capsys.readouterr().out  # the summary table is printed


def test_block_containers_find_the_repeated_blocks(peers):
    import monet.models

    model = monet.models.create("vit_tiny_test")
    (blocks,) = peers.block_containers(model)
    assert blocks is model.blocks
    wrapped, count, total = peers.checkpointed(model, every=2)
    assert (count, total) == (1, 2)
    assert isinstance(wrapped.blocks[0], peers.Checkpointed)
    assert not isinstance(wrapped.blocks[1], peers.Checkpointed)
    assert not isinstance(model.blocks[0], peers.Checkpointed)  # the original is untouched


def test_monet_report_runs_the_peers_benchmark(capsys):
    from monet.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["report", "--help"])
    assert exit_info.value.code == 0
    assert "--compile-budgets" in capsys.readouterr().out
