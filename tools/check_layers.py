"""Check the one-way import direction of secfed (run by ``make lint``).

Layers, high to low; a module may import only from its own layer entry or lower ones, and
siblings in one layer (separated by ``|``) may not import each other:

    secfed.cli
    secfed.flower
    secfed.coordinator | secfed.participant | secfed.demo
    secfed.transport | secfed.audit | secfed.tasks
    secfed.federation
    secfed.training | secfed.data
    secfed.protocol | secfed.privacy | secfed.models
    secfed.config
    secfed.crypto

``secfed.names`` (the shared vocabulary), ``secfed.errors`` and ``secfed.sqlitefiles`` (read-only
SQLite access) are leaves every layer may import.

Forbidden third-party imports: secfed.crypto imports no torch/transformers/opacus/peft/http;
secfed.protocol imports no torch and no transport/sockets; only secfed.transport (and the
process-orchestrating demo and CLI) may import socket-level libraries; ``secfed.federation``
(PKI, enrolment, kits) plans and writes a federation without any of them. ``secfed.tasks`` (the
demo's city-safety task: generator, taxonomy, model recipe) builds on models/data/training and
nothing generic imports it.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SOURCES = {"secfed": ROOT / "secfed", "secfed.crypto": ROOT / "crypto", "secfed.cli": ROOT / "cli"}

LAYERS = [
    ["secfed.cli"],
    ["secfed.flower"],
    ["secfed.coordinator", "secfed.participant", "secfed.demo"],
    ["secfed.transport", "secfed.audit", "secfed.tasks"],
    ["secfed.federation"],
    ["secfed.training", "secfed.data"],
    ["secfed.protocol", "secfed.privacy", "secfed.models"],
    ["secfed.config"],
    ["secfed.crypto"],
]
# Modules outside the layers that anybody may import (shared leaves).
FREE = {"secfed", "secfed.errors", "secfed.progress", "secfed.names", "secfed.sqlitefiles"}

HEAVY = {"torch", "transformers", "opacus", "peft", "tenseal_torch"}
NET = {"socket", "httpx", "fastapi", "uvicorn", "starlette", "requests", "urllib3", "ssl"}
FORBIDDEN_EXTERNAL = {
    "secfed.crypto": HEAVY | NET,
    "secfed.protocol": HEAVY | NET,
    "secfed.privacy": NET,
    "secfed.training": NET,
    "secfed.models": NET,
    "secfed.data": NET,
    "secfed.audit": NET,
    "secfed.tasks": NET,
    "secfed.federation": NET,
    "secfed.names": HEAVY | NET,
}


def module_files() -> dict[str, Path]:
    found: dict[str, Path] = {}
    for prefix, base in SOURCES.items():
        for path in base.rglob("*.py"):
            rel = path.relative_to(base).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            if prefix == "secfed" and parts and parts[0] in ("crypto", "cli"):
                continue
            found[".".join([prefix, *parts])] = path
    return found


def layer_of(module: str) -> tuple[int, str] | None:
    for depth, layer in enumerate(LAYERS):
        for entry in layer:
            if module == entry or module.startswith(entry + "."):
                return depth, entry
    return None


def imports_of(module: str, path: Path) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text(), filename=str(path))
    is_pkg = path.name == "__init__.py"
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".")
                if not is_pkg:
                    base = base[:-1]
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            out.append((node.lineno, target))
    return out


def main() -> int:
    errors = []
    for module, path in sorted(module_files().items()):
        mine = layer_of(module)
        for lineno, target in imports_of(module, path):
            top = target.split(".")[0]
            for scope, banned in FORBIDDEN_EXTERNAL.items():
                if (module == scope or module.startswith(scope + ".")) and top in banned:
                    errors.append(f"{path.relative_to(ROOT)}:{lineno}: {module} must not import {target}")
            if not target.startswith("secfed") or target in FREE or mine is None:
                continue
            theirs = layer_of(target)
            if theirs is None:
                continue
            if theirs[0] < mine[0] or (theirs[0] == mine[0] and theirs[1] != mine[1]):
                errors.append(
                    f"{path.relative_to(ROOT)}:{lineno}: {module} (layer {mine[1]}) "
                    f"must not import {target} (layer {theirs[1]})"
                )
    for line in errors:
        print(line)
    print(f"check_layers: {len(errors)} violation(s)")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
