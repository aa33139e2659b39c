"""Every tools/*.py imports without running: no argv parsed, nothing printed, no exit at import (argparse lives in
main(), run under `if __name__ == "__main__"`)."""
import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TOOLS = sorted(p.stem for p in (ROOT / "tools").glob("*.py"))


def test_tools_found():
    assert {"cells", "core_table", "onnx_compare", "report"} <= set(TOOLS)


@pytest.mark.parametrize("name", TOOLS)
def test_imports_with_foreign_argv(name, monkeypatch, capsys):
    monkeypatch.syspath_prepend(str(ROOT))
    # argv of another program: a tool parsing it at import exits (argparse: unknown option / --help)
    monkeypatch.setattr(sys, "argv", ["some-other-program", "--not-a-tool-option", "--help"])
    monkeypatch.setattr(sys, "path", list(sys.path))  # a tool inserting ROOT is undone after the test
    spec = importlib.util.spec_from_file_location(f"tools.{name}", ROOT / "tools" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, mod)
    try:
        spec.loader.exec_module(mod)
    except SystemExit as exc:
        pytest.fail(f"importing tools/{name}.py exited ({exc.code!r}): it parses argv or runs at import")
    assert capsys.readouterr().out == "", f"importing tools/{name}.py printed: it runs at import"
    assert mod.__name__ != "__main__"
