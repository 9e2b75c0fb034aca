"""docs/ARCHITECTURE.md and docs/CONTRACTS.md against the code.

ARCHITECTURE.md maps a round onto files and functions: every path it names must exist and every
function, method or class it cites must be defined -- in the file named on the same table row
when the row names files. CONTRACTS.md pins what must not drift: every entry of its version
table, its stage / mode / message-type code tables, its ``CREATE`` statements and its
federation.toml key table must equal the code. An entry the code adds and the page does not list
yet (a stage, message type, table or key) does not fail here: append-only is the formats' own
rule, and branches that add entries land in parallel; CONTRACTS.md asks for them by hand. The
code is read with ``ast`` (nothing heavy is imported), so this is fast.
"""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
# Where each import prefix lives (as in tools/check_layers.py).
SOURCES = {"secfed.crypto": ROOT / "crypto", "secfed.cli": ROOT / "cli", "secfed": ROOT / "secfed"}
PATH_ROOTS = ("secfed", "crypto", "cli", "tools", "tests", "bench", "docs", "threat_model",
              "examples")
FILE_SUFFIXES = {"toml", "sqlite", "json", "jsonl", "pem", "key", "ctx", "f32", "md", "py",
                 "safetensors", "png", "html", "lock", "ckks", "txt"}
IDENT = r"[A-Za-z_][A-Za-z0-9_]*"
SPAN = re.compile(r"`([^`\n]+)`")
FENCE = re.compile(r"^```.*?^```", re.S | re.M)


@dataclass
class _Class:
    path: Path
    members: set[str]
    bases: list[str]


@dataclass
class CodeIndex:
    """Names defined in secfed's sources, by module, by file and by class."""

    top: dict[str, set[str]] = field(default_factory=dict)  # module -> top-level names
    module_file: dict[str, Path] = field(default_factory=dict)
    defs: dict[Path, set[str]] = field(default_factory=dict)  # file -> every def/class name
    classes: dict[str, list[_Class]] = field(default_factory=dict)
    trees: dict[Path, ast.Module] = field(default_factory=dict)

    @classmethod
    def build(cls) -> CodeIndex:
        index = cls()
        for prefix, base in SOURCES.items():
            for path in sorted(base.rglob("*.py")):
                rel = path.relative_to(base).with_suffix("")
                parts = [p for p in rel.parts if p != "__init__"]
                if prefix == "secfed" and parts and parts[0] in ("crypto", "cli"):
                    continue
                index._add(".".join([prefix, *parts]), path)
        return index

    def _add(self, module: str, path: Path) -> None:
        tree = ast.parse(path.read_text(), filename=str(path))
        self.trees[path] = tree
        self.module_file[module] = path
        top: set[str] = set()
        for node in tree.body:
            top |= _bound_names(node)
            if isinstance(node, ast.Assign) and any(
                    isinstance(t, ast.Name) and t.id == "__all__" for t in node.targets):
                top |= {e.value for e in getattr(node.value, "elts", [])
                        if isinstance(e, ast.Constant) and isinstance(e.value, str)}
        self.top[module] = top
        defs: set[str] = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                defs.add(node.name)
            if isinstance(node, ast.ClassDef):
                members: set[str] = set()
                for item in node.body:
                    members |= _bound_names(item)
                bases = [b.id if isinstance(b, ast.Name) else getattr(b, "attr", "")
                         for b in node.bases]
                self.classes.setdefault(node.name, []).append(_Class(path, members, bases))
        self.defs[path] = defs

    def has_member(self, cls_name: str, member: str, *, within: set[Path] | None = None,
                   depth: int = 0) -> bool:
        """Whether a class named ``cls_name`` (defined in ``within`` if given) or one of its
        bases defines ``member``."""
        for c in self.classes.get(cls_name, []):
            if within is not None and c.path not in within:
                continue
            if member in c.members:
                return True
            if depth < 5 and any(self.has_member(b, member, depth=depth + 1) for b in c.bases):
                return True
        return False

    def resolve_module_ref(self, dotted: str) -> bool:
        """``secfed.a.b[.Name[.member]]``: the longest module prefix, then its names."""
        parts = dotted.split(".")
        for i in range(len(parts), 0, -1):
            module = ".".join(parts[:i])
            if module not in self.module_file:
                continue
            rest = parts[i:]
            if not rest:
                return True
            if rest[0] not in self.top[module]:
                return False
            if len(rest) == 1:
                return True
            return len(rest) == 2 and self.has_member(rest[0], rest[1])
        return False

    def constant(self, dotted: str) -> object:
        """The literal value of a module-level constant ``secfed.module.NAME``."""
        module, _, name = dotted.rpartition(".")
        tree = self.trees[self.module_file[module]]
        for node in tree.body:
            targets = node.targets if isinstance(node, ast.Assign) else (
                [node.target] if isinstance(node, ast.AnnAssign) else [])
            if any(isinstance(t, ast.Name) and t.id == name for t in targets):
                return ast.literal_eval(node.value)
        raise KeyError(dotted)


def _bound_names(node: ast.stmt) -> set[str]:
    if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
        return {node.name}
    if isinstance(node, ast.Assign):
        return {t.id for t in node.targets if isinstance(t, ast.Name)}
    if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
        return {node.target.id}
    if isinstance(node, ast.Import | ast.ImportFrom):
        return {(a.asname or a.name).split(".")[0] for a in node.names}
    return set()


@pytest.fixture(scope="module")
def index() -> CodeIndex:
    return CodeIndex.build()


def _is_path(span: str) -> bool:
    return "/" in span and " " not in span and span.split("/")[0] in PATH_ROOTS


def _path_exists(span: str) -> bool:
    if "*" in span:
        return any(ROOT.glob(span))
    return (ROOT / span).exists()


def check_references(text: str, index: CodeIndex) -> list[str]:
    """Every reference in ``text`` that does not resolve, one line each.

    Resolved: paths under the repository's top-level folders; ``secfed.*`` module paths and
    their names; ``Class.member`` and ``Class.member()``; ``function()``; bare CamelCase names
    (classes). On a table row that names ``.py`` files, ``Class.member`` and ``function()`` must
    be defined in one of those files. Fenced blocks and other spans (plain words, TOML keys,
    file names) are not references.
    """
    problems: list[str] = []
    for lineno, line in enumerate(FENCE.sub(lambda m: "\n" * m.group(0).count("\n"), text)
                                  .splitlines(), 1):
        spans = SPAN.findall(line)
        row_files = {ROOT / s for s in spans if _is_path(s) and s.endswith(".py")}
        within = row_files if line.lstrip().startswith("|") and row_files else None
        for span in spans:
            ref = span[:-2] if span.endswith("()") else span
            where = f"line {lineno}: `{span}`"
            if _is_path(span):
                if not _path_exists(span):
                    problems.append(f"{where}: no such path")
            elif ref.startswith("secfed.") or ref == "secfed":
                if re.fullmatch(rf"{IDENT}(\.{IDENT})*", ref) and not index.resolve_module_ref(ref):
                    problems.append(f"{where}: not defined")
            elif re.fullmatch(rf"{IDENT}\.{IDENT}", ref) and ref[0].isupper():
                if ref.rsplit(".", 1)[1] in FILE_SUFFIXES:
                    continue
                cls_name, member = ref.split(".")
                if not index.has_member(cls_name, member, within=within):
                    scope = f" in {sorted(str(p.relative_to(ROOT)) for p in within)}" if within else ""
                    problems.append(f"{where}: {cls_name} has no {member}{scope}")
            elif span.endswith("()") and re.fullmatch(IDENT, ref):
                files = within or set(index.defs)
                if not any(ref in index.defs[p] for p in files):
                    problems.append(f"{where}: no def {ref}")
            elif re.fullmatch(r"[A-Z][a-z]\w*", span) and re.search(r"[a-z][A-Z]|^[A-Z][a-z]+$",
                                                                    span):
                if span not in index.classes and not any(span in t for t in index.top.values()):
                    problems.append(f"{where}: no class {span}")
    return problems


@pytest.mark.parametrize("doc", ["ARCHITECTURE.md", "CONTRACTS.md"])
def test_doc_references_exist(doc: str, index: CodeIndex) -> None:
    problems = check_references((DOCS / doc).read_text(), index)
    assert not problems, f"docs/{doc}: stale references:\n" + "\n".join(problems)


def test_reference_checker_flags_stale_names(index: CodeIndex) -> None:
    """The checker is not vacuous: renamed functions, wrong files and missing paths fail."""
    good = ("| s | `secfed/participant/loop.py`: `Participant._enter` | `decode_aggregate()` "
            "in `secfed/protocol/participant.py` |\n`secfed.names.WIRE_STAGES`, `CoordinatorRound`")
    assert check_references(good, index) == []
    bad = [
        "`Participant._enter_round`",  # a renamed method
        "| s | `secfed/coordinator/service.py`: `Participant._enter` |",  # the wrong file
        "| s | `secfed/coordinator/service.py`: `decode_aggregate()` |",
        "`secfed/protocol/nonexistent.py`",
        "`secfed.names.NO_SUCH_TABLE`",
        "`secfed.protocol.spec.RoundSpec.no_such_field`",
        "`CoordinatorRoundX`",
    ]
    for text in bad:
        assert check_references(text, index), f"not flagged: {text}"


# ---------------------------------------------------------------------------- CONTRACTS.md


def _section(text: str, heading: str) -> str:
    """The body of the markdown section whose heading line is ``heading``."""
    lines = text.splitlines()
    start = lines.index(heading)
    level = len(heading) - len(heading.lstrip("#"))
    body = []
    for line in lines[start + 1:]:
        if line.startswith("#") and len(line) - len(line.lstrip("#")) <= level:
            break
        body.append(line)
    return "\n".join(body)


def _rows(section: str) -> list[list[str]]:
    rows = []
    for line in FENCE.sub("", section).splitlines():
        if line.startswith("|") and not set(line) <= set("|-: "):
            rows.append([c.strip() for c in line.strip().strip("|").split("|")])
    return rows[1:]  # drop the header row


def _code_table(section: str) -> list[str]:
    """A ``| code | name |`` table: the names in code order (codes must be 0, 1, 2, ...)."""
    rows = _rows(section)
    assert [int(r[0]) for r in rows] == list(range(len(rows))), "codes must count from 0"
    return [r[1].strip("`") for r in rows]


@pytest.fixture(scope="module")
def contracts() -> str:
    return (DOCS / "CONTRACTS.md").read_text()


def test_contract_versions_equal_the_code(contracts: str, index: CodeIndex) -> None:
    rows = _rows(_section(contracts, "## Versions"))
    assert len(rows) >= 15
    for _what, constant, value in rows:
        name, doc_value = constant.strip("`"), ast.literal_eval(value.strip("`"))
        assert index.constant(name) == doc_value, f"{name}: code {index.constant(name)!r}, doc {doc_value!r}"


def test_contract_codes_equal_the_code(contracts: str, index: CodeIndex) -> None:
    """Every documented code means what the code says; codes are append-only, so the documented
    ones are a prefix of the code's."""
    from secfed import names

    stages = _code_table(_section(contracts, "### Envelope"))
    assert stages == [s.value for s in names.WIRE_STAGES][: len(stages)]
    assert len(stages) >= 7
    modes = _code_table(_section(contracts, "### Round spec"))
    assert modes == list(names.MODES)[: len(modes)]
    assert len(modes) >= 3
    # message type codes: the TYPE of each class named in the table
    rows = _rows(_section(contracts, "### Protocol messages"))
    documented = {int(r[0]): r[1].strip("`") for r in rows}
    assert len(documented) >= 14
    tree = index.trees[index.module_file["secfed.protocol.messages"]]
    in_code = {}
    for node in tree.body:
        if isinstance(node, ast.ClassDef):
            for item in node.body:
                if (isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name)
                        and item.target.id == "TYPE" and item.value is not None):
                    in_code[ast.literal_eval(item.value)] = node.name
    assert documented == {code: in_code.get(code) for code in documented}


SCHEMAS = {  # CONTRACTS.md heading -> the code's schema constant
    "### Coordinator `state.sqlite`": "secfed.coordinator.state.SCHEMA",
    "### Participant `state.sqlite`": "secfed.participant.state.SCHEMA",
    "### Privacy ledger `ledger.sqlite`": "secfed.privacy.ledger._SCHEMA",
}


def _statements(sql: str) -> dict[str, str]:
    """``CREATE`` statements by the table / trigger they create, whitespace and comments
    normalised."""
    sql = re.sub(r"--[^\n]*", "", sql)
    # a trigger's body holds a ';' of its own: split only at ';' that ends a line
    parts = [" ".join(p.split()).rstrip(";") for p in re.split(r";\s*\n", sql + "\n")]
    out = {}
    for part in filter(None, parts):
        name = re.match(r"CREATE (?:TABLE|TRIGGER) IF NOT EXISTS (\w+)", part)
        assert name, f"not a CREATE statement: {part[:60]}"
        out[name.group(1)] = part
    return out


@pytest.mark.parametrize(("heading", "constant"), sorted(SCHEMAS.items()))
def test_contract_sqlite_schemas_equal_the_code(heading: str, constant: str, contracts: str,
                                                index: CodeIndex) -> None:
    """Each documented table and trigger is the code's, column for column."""
    blocks = re.findall(r"^```sql\n(.*?)^```", _section(contracts, heading), re.S | re.M)
    assert len(blocks) == 1, f"{heading}: one sql block"
    documented = _statements(blocks[0])
    code = _statements(index.constant(constant))
    assert len(documented) >= 2
    for name, statement in documented.items():
        assert code.get(name) == statement, f"{heading}: {name} differs from {constant}"


def test_contract_toml_keys_equal_the_models(contracts: str) -> None:
    from secfed import config

    rows = _rows(_section(contracts, "### `federation.toml` and `site.toml`"))
    nested = {"FederationConfig": {"deadlines", "dp", "model", "roster"}, "DPSettings": {"distributed"}}
    seen = set()
    for _table, model, keys in rows:
        name = model.strip("`")
        fields = set(getattr(config, name).model_fields) - nested.get(name, set())
        documented = set(re.findall(r"`([a-z_]+)`", keys))
        assert documented, f"{name}: no key documented"
        assert documented <= fields, f"{name}: documented {sorted(documented - fields)} not in the code"
        seen.add(name)
    assert seen == {"FederationConfig", "Deadlines", "DPSettings", "DistributedDPSettings",
                    "ModelSettings", "RosterEntry", "SitePolicy"}


@pytest.mark.parametrize("doc", ["ARCHITECTURE.md", "CONTRACTS.md"])
def test_doc_links_resolve(doc: str) -> None:
    text = FENCE.sub("", (DOCS / doc).read_text())
    targets = [t for t in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text)
               if not re.match(r"[a-z]+:", t)]
    assert targets, "the page links to its neighbours"
    missing = [t for t in targets if not (DOCS / t).resolve().exists()]
    assert not missing, f"docs/{doc}: broken links {missing}"
