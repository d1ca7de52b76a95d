"""The package's size rules (issue 13): no function over 80 lines, no class over 250 in
diffrec_ext/, so that every unit can be read in one sitting."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "diffrec_ext"
LIMITS = {"function": 80, "class": 250}


def units():
    for path in sorted(PACKAGE.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                yield path.name, "function", node.name, node.end_lineno - node.lineno + 1
            elif isinstance(node, ast.ClassDef):
                yield path.name, "class", node.name, node.end_lineno - node.lineno + 1


def test_the_rules_see_the_package():
    found = list(units())
    assert any(name == "InferenceEngine" for _, _, name, _ in found) and len(found) > 200


@pytest.mark.parametrize("kind", sorted(LIMITS))
def test_no_unit_over_its_limit(kind):
    too_long = [f"{file}: {name} ({lines} lines)" for file, unit, name, lines in units()
                if unit == kind and lines > LIMITS[kind]]
    assert not too_long, f"{kind}s over {LIMITS[kind]} lines: {too_long}"
