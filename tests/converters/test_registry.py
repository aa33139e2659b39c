"""The exporter registry: plain keyword options (the CLI's defaults are the writers' defaults) and the one check of
the master's record kinds before any export."""
import inspect

import pytest
import torch

from converters.registry import load_all, record_kinds
from fixture_modules import converter_fixtures
from neuqi_export.cli import build_parser
from neuqi_export.errors import UserError
from neuqi_export.master import GGUFLinear


@pytest.fixture(scope="module")
def gguf_master(tmp_path_factory):
    """A tiny llama master whose first linear is held in a GGUF type (F16 rows), the rest uniform."""
    fx = converter_fixtures("gguf_fixtures")
    master, _ = fx.make_tiny(tmp_path_factory.mktemp("kinds"), "llama", 4, 32)
    name = next(iter(master.linears))
    w = master.linears[name].dequantize()
    master.linears[name] = GGUFLinear(data=w.half(), qtype="F16", shape=tuple(w.shape), hdiag=torch.ones(w.shape[1]))
    return master, name


@pytest.mark.parametrize("fmt", sorted(load_all()))
def test_cli_defaults_are_the_writers_defaults(fmt):
    """`export --to FMT` with no options passes exactly the writer's defaults (what the demo gets by passing none)."""
    exp = load_all()[fmt]
    opts = exp.options(build_parser().parse_args(["export", "m", "--to", fmt, "-o", "x"]))
    params = inspect.signature(exp.write).parameters
    assert opts == {k: params[k].default for k in opts}
    assert exp.options(build_parser().parse_args(["export", "m", "--to", fmt, "-o", "x", "--force"]))["overwrite"]


def test_record_kinds(gguf_master):
    master, name = gguf_master
    kinds = record_kinds(master)
    assert kinds["gguf"] == [name] and name not in kinds["uniform"] and len(kinds["uniform"]) == len(master.linears) - 1


@pytest.mark.parametrize("fmt", sorted(f for f, e in load_all().items() if "gguf" not in e.accepts))
def test_an_unaccepted_record_kind_is_refused_in_one_line(fmt, gguf_master, tmp_path):
    master, name = gguf_master
    out = tmp_path / "out"
    with pytest.raises(UserError) as exc:
        load_all()[fmt].export(master, out)
    msg = str(exc.value)
    assert "\n" not in msg and "record kind 'gguf'" in msg and name in msg and f"--to {fmt} cannot take" in msg
    assert "export it with --to gguf" in msg
    assert not out.exists() and not list(tmp_path.iterdir())


def test_gguf_accepts_both_kinds(gguf_master, tmp_path):
    master, _ = gguf_master
    rep = load_all()["gguf"].export(master, tmp_path / "m.gguf", embed_type="F16", output_type="F16")
    assert rep.path.is_file() and len(rep.tensors) > len(master.linears)
