"""The daemon and kernel layers stay made of small parts.

A class over 150 lines or a function over 60 lines in ``markrouted/daemon/`` or
``markrouted/kernel/`` must say why in its docstring, with a line starting
``size:`` inside parentheses or not — so growth is a decision someone wrote down,
not an accident (docs/design.md, "The modules").
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "markrouted"
LAYERS = ("daemon", "kernel")
CLASS_MAX, FUNCTION_MAX = 150, 60


def oversized(root: Path) -> list[str]:
    out = []
    for path in sorted(root.rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.ClassDef):
                limit = CLASS_MAX
            elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                limit = FUNCTION_MAX
            else:
                continue
            assert node.end_lineno is not None
            length = node.end_lineno - node.lineno + 1
            doc = ast.get_docstring(node) or ""
            if length > limit and "size:" not in doc:
                out.append(f"{path.relative_to(root.parent)}:{node.lineno} {node.name}: {length} lines > {limit}")
    return out


@pytest.mark.parametrize("layer", LAYERS)
def test_no_oversized_class_or_function_without_a_reason(layer: str) -> None:
    assert oversized(PACKAGE / layer) == []


def test_the_check_sees_an_oversized_function(tmp_path: Path) -> None:
    body = "\n".join(f"    x{i} = {i}" for i in range(FUNCTION_MAX))
    (tmp_path / "big.py").write_text(f"def big():\n{body}\n")
    (tmp_path / "fine.py").write_text(f'def fine():\n    """Long (size: a table)."""\n{body}\n')
    assert [line.split(" ", 1)[1] for line in oversized(tmp_path)] == [f"big: {FUNCTION_MAX + 1} lines > 60"]
