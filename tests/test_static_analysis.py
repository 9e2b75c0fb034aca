"""bandit stays clean, and its one allowed silence (B615 on local-only model loads) stays honest.

``make lint`` runs the same bandit command; this test keeps the rule visible in the suite and
checks what a ``# nosec`` alone cannot: that every ``from_pretrained`` call really is local-only.
"""

from __future__ import annotations

import ast
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCANNED = ("secfed", "crypto", "cli", "bench", "tools")  # = BANDIT_PATHS in the Makefile
NOSEC_B615 = re.compile(r"#\s*nosec\s+B615\s+#\s*\S.{8,}")  # an id, then a reason of some length


def _bandit() -> dict:
    bandit = Path(sys.executable).with_name("bandit")
    if not bandit.exists():
        pytest.fail(f"bandit must be installed in the dev extras (missing {bandit})")
    proc = subprocess.run(
        [str(bandit), "-q", "-r", *SCANNED, "-f", "json"], cwd=ROOT, capture_output=True,
        text=True, timeout=300, check=False,
    )
    return json.loads(proc.stdout)


def test_bandit_has_no_medium_or_high_finding_at_high_confidence() -> None:
    report = _bandit()
    assert report["metrics"]["_totals"]["loc"] > 10_000  # it really scanned the code base
    bad = [f"{r['test_id']} {r['filename']}:{r['line_number']} {r['issue_text']}"
           for r in report["results"]
           if r["issue_severity"] in ("MEDIUM", "HIGH") and r["issue_confidence"] == "HIGH"]
    assert bad == []


def test_the_makefile_runs_bandit_on_the_same_paths() -> None:
    makefile = (ROOT / "Makefile").read_text()
    assert f"BANDIT_PATHS := {' '.join(SCANNED)}" in makefile
    lint = makefile.split("\nlint:", 1)[1].split("\n\n", 1)[0]
    assert "bandit -q -r $(BANDIT_PATHS) --severity-level medium --confidence-level high" in lint


def _from_pretrained_calls(path: Path) -> list[ast.Call]:
    tree = ast.parse(path.read_text(), filename=str(path))
    return [node for node in ast.walk(tree)
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
            and node.func.attr == "from_pretrained"]


def test_every_from_pretrained_is_local_only_and_says_why_it_is_silenced() -> None:
    seen = 0
    for top in SCANNED:
        for path in sorted((ROOT / top).rglob("*.py")):
            lines = path.read_text().splitlines()
            for call in _from_pretrained_calls(path):
                seen += 1
                where = f"{path.relative_to(ROOT)}:{call.lineno}"
                local = [k for k in call.keywords if k.arg == "local_files_only"]
                assert local and isinstance(local[0].value, ast.Constant) \
                    and local[0].value.value is True, f"{where}: needs local_files_only=True"
                assert NOSEC_B615.search(lines[call.lineno - 1]), \
                    f"{where}: needs '# nosec B615  # <why it is local-only>' on its first line"
    assert seen >= 4  # the tower, tokenizer and MiniLM loads exist and were checked


MAX_FUNCTION_LINES = 100  # issue 21's limit; FastAPI route closures live in small route builders


def _long_functions(roots: tuple[str, ...]) -> list[str]:
    found = []
    for root in roots:
        for path in sorted((ROOT / root).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    lines = node.end_lineno - node.lineno + 1  # type: ignore[operator]
                    if lines > MAX_FUNCTION_LINES:
                        found.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({lines} lines)")
    return found


def test_no_function_in_the_package_is_over_100_lines() -> None:
    assert _long_functions(("secfed", "crypto", "cli")) == []


def test_the_length_check_sees_a_long_function(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    body = "\n".join(f"    x{i} = {i}" for i in range(MAX_FUNCTION_LINES))
    (pkg / "m.py").write_text(f"def short():\n    return 1\n\n\ndef long():\n{body}\n")
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    assert _long_functions(("pkg",)) == [f"pkg/m.py:5 long ({MAX_FUNCTION_LINES + 1} lines)"]
