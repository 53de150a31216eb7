"""The run's pieces stay apart: only the entrypoint imports `train` (the loop, the objectives, assessment and
publication read the run through `runtypes.RunContext` and `loop.Hooks`), so there is no import circle."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "trainer-image" / "finetune_trainer"
#: Modules allowed to import `finetune_trainer.train`: the process entrypoint.
ALLOWED = {"entrypoint.py"}


def _names(node: ast.AST) -> list[str]:
    """The modules an import statement imports (`from a import b`: a.b, as b may be a module)."""
    if isinstance(node, ast.ImportFrom) and node.module:
        return [node.module, *(f"{node.module}.{alias.name}" for alias in node.names)]
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    return []


def _imports_train(tree: ast.AST) -> list[int]:
    return [node.lineno for node in ast.walk(tree) if "finetune_trainer.train" in _names(node)]


def test_only_the_entrypoint_imports_train() -> None:
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        lines = _imports_train(ast.parse(path.read_text(encoding="utf-8")))
        if lines and path.name not in ALLOWED:
            found[str(path.relative_to(PACKAGE))] = lines
    assert found == {}, f"modules importing finetune_trainer.train (use runtypes.RunContext): {found}"
    assert _imports_train(ast.parse((PACKAGE / "entrypoint.py").read_text())), "the scan finds no import at all"


def test_the_loop_knows_no_objective() -> None:
    """loop.py talks to objectives.base.Objective only: no sft or dpo module, no dataset collate of its own."""
    tree = ast.parse((PACKAGE / "loop.py").read_text(encoding="utf-8"))
    modules = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert "finetune_trainer.objectives.base" in modules
    assert not modules & {"finetune_trainer.objectives.sft", "finetune_trainer.objectives.dpo",
                          "finetune_trainer.objectives", "finetune_trainer.preference_data"}
