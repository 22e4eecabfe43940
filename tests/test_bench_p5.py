"""The helpers of scripts/scale/p5.py (the bench's P5 rows): the order of the sides, the
loader's protocol lines, and the check that every side computed the same first output."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from scripts.bench import BenchError, write_safetensors
from scripts.scale.p5 import (
    READY,
    RESULT,
    SIDES,
    Loader,
    check_result,
    outputs_agree,
    parse_line,
    side_order,
)


def test_every_side_leads_once_in_three_repeats() -> None:
    orders = [side_order(i) for i in range(3)]
    assert all(sorted(o) == sorted(SIDES) for o in orders)
    assert sorted(o[0] for o in orders) == sorted(SIDES)
    assert sorted(o[-1] for o in orders) == sorted(SIDES)
    assert side_order(3) == orders[0]


def test_parse_line_reads_only_its_own_marked_lines() -> None:
    assert parse_line(f'{RESULT} {{"seconds": 1.5, "output": [1.0]}}', RESULT) == {
        "seconds": 1.5, "output": [1.0]}
    # A library's own output on stdout, or the other marker, is not a result.
    assert parse_line("Batches: 100%|##########| 1/1", RESULT) is None
    assert parse_line(f'{READY} {{"import_s": 2.0}}', RESULT) is None
    assert parse_line(f"{RESULT}X {{}}", RESULT) is None
    with pytest.raises(ValueError):
        parse_line(f"{RESULT} [1, 2]", RESULT)
    with pytest.raises(ValueError):
        parse_line(f"{RESULT} {{not json", RESULT)


def test_outputs_agree_within_tolerance_only() -> None:
    emb = [0.1, -0.25, 0.5]
    assert outputs_agree(emb, [0.1 + 1e-7, -0.25, 0.5])
    assert not outputs_agree(emb, [0.1, -0.25, 0.51])
    assert not outputs_agree(emb, emb[:2])
    # A large sum (the safetensors side) is compared relative to its size.
    assert outputs_agree([123456.0, 16.0], [123456.5, 16.0])
    assert not outputs_agree([123456.0, 16.0], [123470.0, 16.0])


def test_check_result_wants_every_figure_and_a_numeric_output() -> None:
    good = {"seconds": 1.2, "load_s": 0.7, "first_s": 0.5, "load_faults": 3, "first_faults": 0,
            "output": [0.5, -1.0]}
    assert check_result(good)
    assert not check_result({**good, "output": []})
    assert not check_result({**good, "output": ["0.5"]})
    assert not check_result({**good, "output": 0.5})
    missing = dict(good)
    del missing["first_s"]
    assert not check_result(missing)
    assert not check_result({**good, "seconds": "1.2"})


# The loader imports torch in its own process: checked for, not imported here (seconds).
needs_torch = pytest.mark.skipif(
    not all(importlib.util.find_spec(m) for m in ("torch", "safetensors")),
    reason="torch and safetensors are not installed")


@needs_torch
def test_the_loader_reports_the_first_tensors_sum(tmp_path: Path) -> None:
    np = pytest.importorskip("numpy")
    path = tmp_path / "model.safetensors"
    write_safetensors(path, 3, 64 * 1024, seed=7)
    want = np.random.default_rng(7).standard_normal(16 * 1024, dtype=np.float32)
    with Loader("safetensors") as loader:
        loader.ready()
        result = loader.load(str(path))
    assert result["output"][1] == 3  # tensors loaded
    assert result["output"][0] == pytest.approx(float(want.astype(np.float64).sum()), rel=1e-9)
    assert 0 < result["load_s"] <= result["seconds"]


@needs_torch
def test_a_loader_that_fails_is_a_bench_error_with_its_reason(tmp_path: Path) -> None:
    with Loader("safetensors") as loader:
        loader.ready()
        with pytest.raises(BenchError, match=r"P5 loader exited 1: .*No such file"):
            loader.load(str(tmp_path / "missing.safetensors"))
