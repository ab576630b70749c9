"""The package's layering: the engine core never imports the research pieces or the application,
the research pieces never import the application, and shipped files speak of the project only."""
import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "mtdl_fast"
SHIPPED = [*PACKAGE.rglob("*.py"), *(ROOT / "kernels").rglob("*.py"), *(ROOT / "csrc").glob("*.*"),
           ROOT / "setup.py", ROOT / "pyproject.toml", ROOT / "Makefile"]


def layer(module: str) -> int:
    """0 core, 1 research, 2 application (higher layers may import lower ones only)."""
    if module.startswith("mtdl_fast.app") or module == "mtdl_fast.__main__":  # `python -m mtdl_fast` is the CLI
        return 2
    if module.startswith("mtdl_fast.research"):
        return 1
    return 0


def imported_modules(path: Path) -> set[str]:
    """Every mtdl_fast module a file imports, at any depth (function-level imports included)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found |= {f"{node.module}.{alias.name}" for alias in node.names}
    return {m for m in found if m.startswith("mtdl_fast")}


def module_name(path: Path) -> str:
    return ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")


@pytest.mark.parametrize("path", sorted(p for p in PACKAGE.rglob("*.py") if p.name != "__init__.py"),
                         ids=lambda p: str(p.relative_to(ROOT)))
def test_imports_point_downward(path):
    own = layer(module_name(path))
    upward = sorted(m for m in imported_modules(path) if layer(m) > own)
    assert not upward, f"{module_name(path)} (layer {own}) imports {upward}"


def test_the_detector_sees_upward_imports(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text("def f():\n    from mtdl_fast.app.trainer import run\n")
    assert imported_modules(probe) == {"mtdl_fast.app.trainer", "mtdl_fast.app.trainer.run"}


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: str(p.relative_to(ROOT)))
def test_shipped_files_speak_of_the_project_only(path):
    text = path.read_text(errors="replace")
    assert not re.search(r"\bissues?\s*#?\s*\d+|\bthe issue's", text, re.IGNORECASE), "issue numbers"
    assert "../shared" not in text and "SEMANTICS.md" not in text and "DESIGN.md" not in text
