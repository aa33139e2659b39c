"""Distillation on tiny random models: gradients, loss goes down, frozen parts stay, resume, bad input."""
import pytest
import torch

from neuqi_export.cli import main
from neuqi_export.data import calibration_windows, read_text
from neuqi_export.distill import DistillOptions, QuantLinear, distill, lr_lambda
from neuqi_export.errors import UserError
from neuqi_export.master import MasterCheckpoint, QuantizedLinear
from neuqi_export.modeling import load_hf_model, master_to_hf
from neuqi_export.pipeline import QuantizeOptions, quantize_model

from model_factory import families

FAST = dict(nsamples=4, seqlen=64)


@pytest.fixture(scope="module")
def calib(real_assets):
    return read_text(real_assets.calib_text)[:30000]  # tokenizing the whole file would dominate the test time


def _master(model_dir, out, calib):
    quantize_model(model_dir, out, QuantizeOptions(bits=2, group_size=32, init="neuqi", gptq=True, **FAST),
                   calib_text=calib, progress=False)
    return out


@pytest.fixture(scope="module")
def llama_master(tiny_llama_dir, tmp_path_factory, calib):
    return _master(tiny_llama_dir, tmp_path_factory.mktemp("dl") / "m", calib)


@pytest.fixture(scope="module")
def qwen2_master(tiny_qwen2_dir, tmp_path_factory, calib):
    return _master(tiny_qwen2_dir, tmp_path_factory.mktemp("dq") / "m", calib)


@pytest.fixture(scope="module")
def family_master(tiny_family_dir, tmp_path_factory, calib, llama_master, qwen2_master):
    """family_master(model_type) -> (a tiny 2-bit NeUQI + GPTQ master of that family, its teacher directory)."""
    made = {"llama": llama_master, "qwen2": qwen2_master}

    def get(model_type: str):
        if model_type not in made:
            made[model_type] = _master(tiny_family_dir(model_type), tmp_path_factory.mktemp(f"d_{model_type}") / "m", calib)
        return made[model_type], tiny_family_dir(model_type)

    return get


def _hidden_mse(model_or_master, teacher, ids):
    model = master_to_hf(model_or_master) if isinstance(model_or_master, MasterCheckpoint) else model_or_master
    with torch.no_grad():
        return float(((model.model(input_ids=ids).last_hidden_state - teacher.model(input_ids=ids).last_hidden_state) ** 2).mean())


def test_quant_linear_gradients_match_plain_autograd():
    torch.manual_seed(0)
    out, inp, gs = 6, 40, 16  # ragged last group
    rec = QuantizedLinear(torch.randint(0, 8, (out, inp), dtype=torch.uint8), torch.rand(out, 3) + 0.1,
                          torch.rand(out, 3) * 7, 3, gs)
    bias = torch.randn(out)
    mod = QuantLinear(rec, bias)
    x = torch.randn(2, 5, inp, requires_grad=True)
    mod(x).pow(2).sum().backward()
    s, z, b = (t.detach().clone().requires_grad_() for t in (rec.scale, rec.zero, bias))
    x2 = x.detach().clone().requires_grad_()
    w = s.repeat_interleave(gs, 1)[:, :inp] * (rec.codes.float() - z.repeat_interleave(gs, 1)[:, :inp])
    torch.nn.functional.linear(x2, w, b).pow(2).sum().backward()
    for got, want in ((mod.scale.grad, s.grad), (mod.zero.grad, z.grad), (mod.bias.grad, b.grad), (x.grad, x2.grad)):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_lr_schedule_warms_up_then_decays_to_zero():
    f = lr_lambda(20, 0.1)
    assert [round(f(t), 3) for t in (0, 1)] == [0.5, 1.0]
    assert f(2) == pytest.approx(1.0) and f(11) < f(5) and f(19) < 0.02


@pytest.mark.parametrize("which", families())
def test_distill_lowers_the_loss_and_keeps_codes_and_embeddings(which, family_master, tmp_path, calib):
    master_dir, teacher_dir = family_master(which)
    opts = DistillOptions(nsamples=4, seqlen=64, steps=12)
    summary = distill(master_dir, teacher_dir, calib, tmp_path / "d", opts, device="cpu", progress=False)
    assert summary.steps == 12
    before, after = MasterCheckpoint.load(master_dir), MasterCheckpoint.load(tmp_path / "d")
    assert after.quantization_config["distill"]["steps"] == 12
    assert not (tmp_path / "d.partial").exists()
    moved = 0
    for name, lin in before.linears.items():
        new = after.linears[name]
        assert torch.equal(new.codes, lin.codes) and (new.scale > 0).all()
        moved += not torch.equal(new.scale, lin.scale)
    assert moved == len(before.linears)
    for name, t in before.tensors.items():
        changed = not torch.equal(after.tensors[name], t)
        trained = "norm" in name or name.endswith(".bias")
        assert changed == trained, name
    teacher, tok, _ = load_hf_model(teacher_dir)
    ids = calibration_windows(tok, calib, 4, 64)
    a, b = _hidden_mse(after, teacher, ids), _hidden_mse(before, teacher, ids)
    assert a < 0.9 * b
    assert master_to_hf(after)(ids[:1]).logits.isfinite().all()


def test_interrupted_run_resumes_to_the_same_result(llama_master, tiny_llama_dir, tmp_path, calib):
    opts = dict(nsamples=3, seqlen=32, steps=6, checkpoint_every=2)
    distill(llama_master, tiny_llama_dir, calib, tmp_path / "clean", DistillOptions(**opts), progress=False)

    def boom(step, loss):
        if step == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        distill(llama_master, tiny_llama_dir, calib, tmp_path / "r", DistillOptions(**opts), progress=False,
                callback=boom)
    assert (tmp_path / "r.partial" / "train.safetensors").is_file() and not (tmp_path / "r").exists()
    s = distill(llama_master, tiny_llama_dir, calib, tmp_path / "r", DistillOptions(**opts), progress=False)
    assert s.resumed_at == 4
    a, b = MasterCheckpoint.load(tmp_path / "clean"), MasterCheckpoint.load(tmp_path / "r")
    for name, lin in a.linears.items():
        assert torch.equal(lin.scale, b.linears[name].scale) and torch.equal(lin.zero, b.linears[name].zero)
    for name, t in a.tensors.items():
        assert torch.equal(t, b.tensors[name])


def test_shared_teacher_targets_are_computed_once(llama_master, tiny_llama_dir, tmp_path, calib, monkeypatch):
    import neuqi_export.modeling as modeling

    opts = DistillOptions(nsamples=2, seqlen=32, steps=2)
    distill(llama_master, tiny_llama_dir, calib, tmp_path / "a", opts, progress=False, targets_dir=tmp_path / "t")
    assert len(list((tmp_path / "t").glob("targets-*/teacher.f32"))) == 1

    def no_teacher(*a, **k):
        raise AssertionError("teacher loaded again")

    monkeypatch.setattr(modeling, "load_hf_model", no_teacher)
    distill(llama_master, tiny_llama_dir, calib, tmp_path / "b", opts, progress=False, targets_dir=tmp_path / "t")
    assert MasterCheckpoint.load(tmp_path / "b").linears and (tmp_path / "t").is_dir()


def test_bad_inputs_raise_user_errors(llama_master, tiny_llama_dir, tiny_qwen2_dir, tmp_path, calib):
    ok = DistillOptions(nsamples=2, seqlen=32, steps=1)
    cases = [
        (dict(master_dir=tiny_llama_dir), "not a neuqi-export master"),
        (dict(teacher_dir=tiny_qwen2_dir), "does not match the master"),
        (dict(teacher_dir=tmp_path / "nope"), "does not exist"),
        (dict(text="too short"), "needs at least seqlen"),
        (dict(opts=DistillOptions(lr=-1.0)), "--lr must be a positive"),
        (dict(opts=DistillOptions(nsamples=0)), "--nsamples must be"),
        (dict(opts=DistillOptions(seqlen=4096, nsamples=1)), "exceeds the model's context"),
        (dict(out=llama_master), "already exists"),
        (dict(device="cuda:7" if not torch.cuda.is_available() else "tpu"), "--device"),
    ]
    for kw, msg in cases:
        args = dict(master_dir=llama_master, teacher_dir=tiny_llama_dir, text=calib, out=tmp_path / "o", opts=ok,
                    device="cpu", progress=False)
        args.update(kw)
        with pytest.raises(UserError, match=msg):
            distill(**args)
    assert not list(tmp_path.iterdir())  # nothing half-written
    with pytest.raises(UserError, match="is the input master"):
        distill(llama_master, tiny_llama_dir, calib, llama_master, ok, force=True, progress=False)


def test_cli_distill_writes_a_master_and_reports_errors_in_one_line(llama_master, tiny_llama_dir, calib, tmp_path,
                                                                     capsys):
    (tmp_path / "t.txt").write_text(calib, encoding="utf-8")
    base = ["distill", str(llama_master), "--teacher", str(tiny_llama_dir), "--text", str(tmp_path / "t.txt"),
            "--nsamples", "2", "--seqlen", "32", "--quiet", "--device", "cpu"]
    assert main([*base, "-o", str(tmp_path / "d")]) == 0
    assert "distilled 2 steps" in capsys.readouterr().out
    MasterCheckpoint.load(tmp_path / "d")
    assert main([*base, "-o", str(tmp_path / "d")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "already exists" in err and "--force" in err


def test_a_distilled_master_goes_through_every_exporter_unchanged(llama_master, tiny_llama_dir, tmp_path, calib):
    """The output is an ordinary master: each registered format exports it and scores like it in its runtime."""
    from converters.registry import load_all as exporters
    from neuqi_export.evaluate import window_nll
    from runtimes.registry import runtime_for

    d = tmp_path / "d"
    distill(llama_master, tiny_llama_dir, calib, d, DistillOptions(nsamples=2, seqlen=32, steps=3), progress=False)
    master = MasterCheckpoint.load(d)
    ids = calibration_windows(load_hf_model(tiny_llama_dir)[1], calib, 1, 48, seed=5)
    with torch.no_grad():
        want = float(window_nll(master_to_hf(master)(ids).logits.numpy(), ids).mean())
    for fmt, exporter in exporters().items():
        path = tmp_path / ("m.gguf" if fmt == "gguf" else fmt)
        exporter.export(master, path)
        got = float(window_nll(runtime_for(path).load(path).logits(ids.numpy()), ids).mean())
        assert abs(got / want - 1) < 0.03, (fmt, got, want)


def test_a_quantized_head_stays_frozen(head_master, tiny_llama_dir, tmp_path, calib):
    """NEUQI.md freezes lm_head: a quantized (tied) head keeps its scales and zeros, so the embedding the master
    derives from it is the one the student was trained with."""
    from neuqi_export.distill import build_student, trainable

    path = head_master("llama", 4)
    before = MasterCheckpoint.load(path)
    assert not any(n.startswith("lm_head") or "embed" in n for n in trainable(build_student(before)))
    distill(path, tiny_llama_dir, calib, tmp_path / "d", DistillOptions(nsamples=2, seqlen=32, steps=2), device="cpu",
            progress=False)
    after = MasterCheckpoint.load(tmp_path / "d")
    a, b = before.linears["lm_head"], after.linears["lm_head"]
    assert torch.equal(a.codes, b.codes) and torch.equal(a.scale, b.scale) and torch.equal(a.zero, b.zero)
    assert after.head_shares_embedding and torch.equal(after.tensors["model.embed_tokens.weight"], b.dequantize())
    assert not torch.equal(after.linears["model.layers.0.mlp.up_proj"].scale, before.linears["model.layers.0.mlp.up_proj"].scale)


@pytest.mark.parametrize("which", ["qwen3_moe", "mixtral"])
def test_moe_student_computes_the_master_and_trains_every_expert(which, family_master, calib):
    """Before any step the student (each expert a QuantLinear, distill_experts.py) computes the master's
    dequantized model; it trains every expert's scales and zeros, and not the router."""
    from neuqi_export.distill import build_student, trainable

    master_dir, teacher_dir = family_master(which)
    master = MasterCheckpoint.load(master_dir)
    student = build_student(master)
    ids = calibration_windows(load_hf_model(teacher_dir)[1], calib, 1, 48, seed=2)
    with torch.no_grad():
        torch.testing.assert_close(student(ids).logits, master_to_hf(master)(ids).logits, rtol=1e-5, atol=1e-5)
    names = set(trainable(student))
    experts = [n for n in master.linears if ".experts." in n]
    assert experts and all(f"{n}.scale" in names and f"{n}.zero" in names for n in experts)
    assert not any(".mlp.gate." in n for n in names)
