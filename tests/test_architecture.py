"""The import rules of docs/architecture.md, checked on every import of the package (lazy
imports inside functions included): a package may import only the packages on its line."""

from __future__ import annotations

import ast
import re
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "neuroloc_cli"
DOC = Path(__file__).resolve().parents[1] / "docs" / "architecture.md"


def _rules() -> dict[str, set[str] | None]:
    """`package -> allowed packages` from the doc's table (None: anything)."""
    section = DOC.read_text().split("## Import rules", 1)[1].split("\n## ", 1)[0]
    rules: dict[str, set[str] | None] = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) != 2 or not cells[0].startswith("`"):
            continue
        allowed = None if cells[1] == "anything" else set(re.findall(r"`(\w+)`", cells[1]))
        for name in re.findall(r"`(\w+)`", cells[0]):
            rules[name] = allowed
    return rules


def _imports(file: Path) -> set[str]:
    """The top-level neuroloc packages a file imports (`neuroloc_cli.X...` → X)."""
    found = set()
    for node in ast.walk(ast.parse(file.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level > 0:
            found.add(f"(relative import in {file.name}: write it absolute)")
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("neuroloc_cli"):
            names = node.module.split(".")[1:2] or [a.name for a in node.names]
            found.update(names)
        elif isinstance(node, ast.Import):
            found.update(a.name.split(".")[1] for a in node.names if a.name.startswith("neuroloc_cli."))
    return found - {"__version__"}


def _package(file: Path) -> str:
    rel = file.relative_to(PACKAGE)
    return rel.parts[0] if len(rel.parts) > 1 else rel.stem


def test_the_doc_has_a_rule_for_every_package():
    rules = _rules()
    packages = {_package(f) for f in PACKAGE.rglob("*.py")} - {"__init__", "__main__"}
    assert packages <= set(rules), f"no import rule for {sorted(packages - set(rules))} in docs/architecture.md"


def test_every_import_follows_the_rules():
    rules = _rules()
    broken = []
    for file in sorted(PACKAGE.rglob("*.py")):
        pkg = _package(file)
        allowed = rules.get(pkg, set()) if pkg not in ("__init__", "__main__") else None
        if allowed is None:
            continue
        for imported in sorted(_imports(file) - allowed - {pkg}):
            broken.append(f"{file.relative_to(PACKAGE.parent)} imports neuroloc_cli.{imported}")
    assert not broken, "\n".join(broken)


def test_nothing_but_the_command_line_imports_it():
    users = [f for f in PACKAGE.rglob("*.py") if "cli" in _imports(f) and _package(f) not in ("cli", "__main__")]
    assert not users


def test_command_modules_import_no_other_command():
    """Each command module imports on its own: shared pieces live in cli/options.py and
    cli/render.py, and only cli/app.py imports the commands."""
    import subprocess
    import sys

    cli = PACKAGE / "cli"
    for file in sorted(cli.glob("*_cmd*.py")):
        tree = ast.parse(file.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("neuroloc_cli.cli."):
                assert node.module.rsplit(".", 1)[1] in ("options", "render"), f"{file.name} imports {node.module}"
        module = f"neuroloc_cli.cli.{file.stem}"
        r = subprocess.run([sys.executable, "-c", f"import {module}"], capture_output=True, text=True, cwd=PACKAGE.parent)
        assert r.returncode == 0, f"import {module}: {r.stderr.strip().splitlines()[-1:]}"
