"""Every test node id named in threat_model/THREATS.md exists (checked by parsing, not importing)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
THREATS = ROOT / "threat_model" / "THREATS.md"
NODE_ID = re.compile(r"`(tests/[\w/]+\.py)::(\w+)(\[[^\]`]*\])?`")


def _table_rows() -> list[str]:
    text = THREATS.read_text(encoding="utf-8")
    section = text.split("## Threats, mitigations, bounds, tests", 1)[1].split("\n## ", 1)[0]
    return [line for line in section.splitlines() if line.startswith("|") and "`tests/" in line]


def _functions(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    return {node.name for node in tree.body if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)}


def test_threat_table_lists_tests_for_every_threat() -> None:
    rows = _table_rows()
    assert len(rows) >= 15
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert len(cells) == 4, row
        assert NODE_ID.search(cells[3]), f"threat without a test: {cells[0]}"


def test_every_listed_node_id_exists() -> None:
    missing = []
    cache: dict[Path, set[str]] = {}
    for row in _table_rows():
        for file, name, _ in NODE_ID.findall(row):
            path = ROOT / file
            if not path.is_file():
                missing.append(f"{file} (no such file)")
                continue
            if path not in cache:
                cache[path] = _functions(path)
            if not name.startswith("test_") or name not in cache[path]:
                missing.append(f"{file}::{name}")
    assert not missing, f"THREATS.md names tests that do not exist: {missing}"


def test_checker_catches_a_missing_test(tmp_path: Path) -> None:
    fake = "| t | m | b | `tests/protocol/test_adversary.py::test_no_such_thing` |"
    file, name, _ = NODE_ID.findall(fake)[0]
    assert name not in _functions(ROOT / file)
