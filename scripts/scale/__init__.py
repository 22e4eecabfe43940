"""Scale goals of scripts/bench (issue 15): one module per goal, P1..P7.

Each module in EXTENSIONS provides

    GOALS: list[str]                       # e.g. ["P1"]
    setup(bench) -> None                   # extra models or tools; raise BenchError → n/a
    steps(bench) -> list[tuple[list[str], Callable[[int], None]]]
                                           # (goals, fn(repeat_index)), run by Bench.section
    rows(bench, row) -> None               # row(...) as in Bench.rows, once per row

Modules import scripts.bench inside functions only (it imports this package first). A
measurement records samples with bench.add(key, value); a row's id starts with its goal
("P1.cat"), and a row whose samples are missing reads "not measured".
"""

from __future__ import annotations

from types import ModuleType

from scripts.scale import p1, p2, p3, p4, p5, p6, p7

EXTENSIONS: list[ModuleType] = [p1, p2, p3, p4, p5, p6, p7]
