"""``ops/`` is the math: pure torch on (B, H, L, Dh) tensors. Its modules import nothing from fairseq or the rest
of the package, and nothing private from each other."""
import ast
import sys
from pathlib import Path

import pytest

import fairseq_helpers as H

OPS = H.REPO / "fluence_fairseq" / "ops"
ALLOWED_TOP_LEVEL = {"torch", "numpy"} | set(sys.stdlib_module_names)


def _imports(path: Path):
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, 0, alias.name, None
        elif isinstance(node, ast.ImportFrom):
            for alias in node.names:
                yield node.lineno, node.level, node.module or "", alias.name


@pytest.mark.parametrize("path", sorted(OPS.glob("*.py")), ids=lambda p: p.name)
def test_an_op_imports_only_torch_the_standard_library_and_other_ops(path):
    for line, level, module, name in _imports(path):
        where = f"{path.name}:{line}"
        if level == 0:
            assert module.split(".")[0] in ALLOWED_TOP_LEVEL, f"{where} imports {module}: ops/ is pure torch"
        else:
            assert level == 1, f"{where} imports from outside ops/ ({'.' * level}{module})"
            assert name is None or not name.startswith("_"), f"{where} imports the private {module}.{name}"


def test_the_checker_catches_what_it_forbids(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("from ..modules.masks import relative_positions\nimport fairseq\nfrom .band import _acc\n")
    found = list(_imports(bad))
    assert (1, 2, "modules.masks", "relative_positions") in found and (2, 0, "fairseq", None) in found
    assert (3, 1, "band", "_acc") in found
