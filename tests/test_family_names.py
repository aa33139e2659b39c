"""A model family is one registry entry: no module of the toolkit outside neuqi_export/archs names a model_type."""
import ast
from pathlib import Path

from neuqi_export.archs import REGISTRY

ROOT = Path(__file__).resolve().parents[1]
# llama.cpp's tokenizer ids (`tokenizer.ggml.model` "llama", `tokenizer.ggml.pre` "qwen2"): GGUF values chosen by the
# tokenizer.json's contents, not by the model family; each may appear once, in vocab.py's table of those ids
TOKENIZER_NAMES = {ROOT / "converters" / "gguf" / "vocab.py": {"llama": 1, "qwen2": 1}}


def family_literals(path: Path) -> list[tuple[int, str]]:
    """(line, text) of every string constant in `path` that equals a registered model_type."""
    tree = ast.parse(path.read_text(), filename=str(path))
    return [(n.lineno, n.value) for n in ast.walk(tree)
            if isinstance(n, ast.Constant) and isinstance(n.value, str) and n.value in REGISTRY]


def test_no_module_outside_the_registry_names_a_model_type():
    found = []
    for package in ("neuqi_export", "converters", "runtimes"):
        for path in sorted((ROOT / package).rglob("*.py")):
            if (ROOT / "neuqi_export" / "archs") in path.parents:
                continue
            allowed = dict(TOKENIZER_NAMES.get(path, {}))
            for line, text in family_literals(path):
                if allowed.get(text, 0) > 0:
                    allowed[text] -= 1
                else:
                    found.append(f"{path.relative_to(ROOT)}:{line}: {text!r}")
    assert not found, "model_type named outside neuqi_export/archs (make it a Family field):\n" + "\n".join(found)


def test_the_scan_sees_a_named_family(tmp_path):
    """The scan is not blind: a module naming a family is caught."""
    mod = tmp_path / "m.py"
    mod.write_text("RENORM = {'mixtral': True}\nx = 'not a family'\n")
    assert family_literals(mod) == [(1, "mixtral")]
