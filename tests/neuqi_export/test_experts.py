"""Mixture-of-experts quantization (neuqi_export/experts.py) on tiny qwen3_moe and mixtral models: each expert's H
against X_eᵀX_e recomputed with plain torch from the block input, an expert the router never picks, the master
against the float model, and a run resumed in the middle of a MoE block."""
import json

import pytest
import torch
from model_factory import tiny_config

from neuqi_export import experts, pipeline
from neuqi_export.archs import family_for, get_blocks
from neuqi_export.calibration import capture_block_inputs
from neuqi_export.data import read_text
from neuqi_export.master import MasterCheckpoint
from neuqi_export.modeling import load_hf_model, master_to_hf
from neuqi_export.pipeline import QuantizeOptions, quantize_model

MOE = ("qwen3_moe", "mixtral")
OPTS = dict(nsamples=4, seqlen=64)
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def calib(real_assets):
    return read_text(real_assets.calib_text)


def _ids(tok, text: str, n: int = 3, length: int = 48) -> torch.Tensor:
    ids = tok(text[:20000])["input_ids"]
    return torch.tensor([ids[i * length:(i + 1) * length] for i in range(n)])


def _routed_reference(block, fam, x: torch.Tensor, kwargs: dict):
    """(tokens entering the experts (T, H), top-k indices (T, k)) recomputed with plain torch from the block input."""
    h = x + block.self_attn(hidden_states=block.input_layernorm(x), **kwargs)[0]
    z = block.post_attention_layernorm(h).reshape(-1, x.shape[-1])
    router = fam.router.split(".")
    w = getattr(getattr(block, router[0]), router[1]).weight
    probs = torch.softmax(z.double() @ w.double().T, dim=-1)
    return z, torch.topk(probs, int(block.mlp.gate.top_k), dim=-1).indices


@pytest.mark.parametrize("model_type", MOE)
def test_each_expert_hessian_is_its_routed_tokens_gram(model_type, tiny_family_dir, calib):
    model, tok, cfg = load_hf_model(tiny_family_dir(model_type))
    fam = family_for(cfg)
    blocks = get_blocks(model, fam)
    inputs, kwargs = capture_block_inputs(model, blocks, _ids(tok, calib), "cpu")
    block = blocks[0]
    accs, every = experts.collect_gate_up(block, fam, inputs, kwargs[0], "cpu")
    mod = block.mlp.experts
    n_exp = mod.gate_up_proj.shape[0]
    ref = [torch.zeros(cfg["hidden_size"], cfg["hidden_size"], dtype=torch.float64) for _ in range(n_exp)]
    ref_down, counts = [0.0] * n_exp, [0] * n_exp
    with torch.no_grad():
        for x in inputs:
            z, idx = _routed_reference(block, fam, x, kwargs[0])
            for e in range(n_exp):
                xe = z[(idx == e).any(-1)]
                counts[e] += xe.shape[0]
                ref[e] += xe.double().T @ xe.double()
                inter = mod.gate_up_proj.shape[1] // 2
                g, u = xe @ mod.gate_up_proj[e, :inter].T, xe @ mod.gate_up_proj[e, inter:].T
                a = torch.nn.functional.silu(g) * u
                ref_down[e] = ref_down[e] + a.double().T @ a.double()
    assert [a.count for a in accs] == counts and sum(counts) == 2 * every.count and min(counts) > 0
    diff = max(float((a.sum - r).abs().max() / r.abs().max()) for a, r in zip(accs, ref))
    assert diff < 1e-12, diff  # measured 4.5e-16 (qwen3_moe), 4.8e-16 (mixtral)
    down = experts.collect_down(block, fam, inputs, kwargs[0], "cpu", set())
    diff_down = max(float((a.sum - r).abs().max() / r.abs().max()) for a, r in zip(down, ref_down))
    assert diff_down < 1e-12, diff_down  # measured 4.3e-16, 4.4e-16


def _never_routed_model(tmp_path, real_tokenizer, model_type: str, dead: int = 3):
    """A tiny MoE model whose block-0 router never picks expert `dead`: every token carries +3 on hidden
    coordinate 0 (embedding column), the norm keeps it positive, the routers ignore that coordinate except the dead
    expert's row, -50·e_0."""
    from transformers import AutoModelForCausalLM

    cfg = tiny_config(model_type, len(real_tokenizer), init_range=0.02, max_positions=2048)
    torch.manual_seed(5)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    with torch.no_grad():
        model.model.embed_tokens.weight[:, 0] = 3.0
        for layer in model.model.layers:  # coordinate 0 steers no other routing
            layer.mlp.gate.weight[:, 0] = 0.0
        block = model.model.layers[0]
        block.post_attention_layernorm.weight[0] = 1.0
        block.mlp.gate.weight[dead] = 0.0
        block.mlp.gate.weight[dead, 0] = -50.0
    model.save_pretrained(str(tmp_path))
    real_tokenizer.save_pretrained(str(tmp_path))
    return tmp_path


@pytest.mark.parametrize("model_type", MOE)
def test_an_expert_with_no_tokens_gets_the_fallback(model_type, tmp_path, real_tokenizer, calib):
    src = _never_routed_model(tmp_path / "src", real_tokenizer, model_type)
    opts = QuantizeOptions(bits=4, group_size=32, init="neuqi", gptq=True, **OPTS)
    summary = quantize_model(src, tmp_path / "m", opts, calib_text=calib, progress=False)
    dead = {n: v for n, v in summary.per_layer.items() if ".experts." in n and v["fallback"]}
    forced = {f"model.layers.0.mlp.experts.3.{p}" for p in experts.PARTS}
    assert forced <= set(dead) and all(dead[n]["tokens"] == 0 for n in forced)
    assert all(v["tokens"] < experts.MIN_EXPERT_TOKENS for v in dead.values())
    assert f"{len(dead) // 3} with < 8 tokens" in str(summary) and "model.layers.0.mlp.experts.3: 0" in str(summary)
    # the fallback H (gate/up) is that of every token entering block 0's experts, damped: recompute its diagonal
    model, tok, cfg = load_hf_model(src)
    fam = family_for(cfg)
    blocks = get_blocks(model, fam)
    from neuqi_export.data import calibration_windows

    windows = calibration_windows(tok, calib, opts.nsamples, opts.seqlen, seed=opts.seed)
    master = MasterCheckpoint.load(tmp_path / "m")
    q = master_to_hf(master)
    qblock = get_blocks(q, fam)[0]  # attention as quantized: the tokens the experts saw
    inputs, kwargs = capture_block_inputs(model, blocks, windows, "cpu")
    every = torch.zeros(cfg["hidden_size"], dtype=torch.float64)
    n = 0
    with torch.no_grad():
        for x in inputs:
            z, idx = _routed_reference(qblock, fam, x, kwargs[0])
            assert not (idx == 3).any()
            every += (z.double() ** 2).sum(0)
            n += z.shape[0]
    h = every / n
    h = h + opts.percdamp * h.mean()
    got = master.linears["model.layers.0.mlp.experts.3.gate_proj"].hdiag.double()
    assert float((got - h).abs().max() / h.abs().max()) < 1e-5


@pytest.mark.parametrize("model_type", MOE)
def test_moe_master_is_close_to_the_float_model_at_4_bits(model_type, tiny_family_dir, tmp_path, calib):
    src = tiny_family_dir(model_type)
    orig, tok, _ = load_hf_model(src)
    ids = _ids(tok, calib[5000:], n=2)
    errs = {}
    for bits in (2, 4):
        opts = QuantizeOptions(bits=bits, group_size=32, init="neuqi", gptq=True, **OPTS)
        quantize_model(src, tmp_path / f"m{bits}", opts, calib_text=calib, progress=False)
        with torch.no_grad():
            lq = master_to_hf(MasterCheckpoint.load(tmp_path / f"m{bits}"))(ids).logits
            lo = orig(ids).logits
        errs[bits] = float((lq - lo).abs().mean() / lo.abs().mean())
        if bits == 4:
            agree = float((lq.argmax(-1) == lo.argmax(-1)).float().mean())
    # measured (mean |Δ| / mean |ref|): qwen3_moe 2-bit 0.317, 4-bit 0.078 (argmax 1.0); mixtral 0.221, 0.050
    # (argmax 0.80: its near-uniform random logits make the top token fragile)
    assert errs[4] < 0.3 * errs[2] and errs[4] < 0.1 and agree > 0.7, (errs, agree)


def _sha(path) -> dict:
    """sha256 of every tensor of the master at `path` (sharded masters: master_store.tensor_digests)."""
    from neuqi_export.master_store import tensor_digests

    return tensor_digests(path)


@pytest.mark.parametrize("model_type", MOE)
def test_resume_in_the_middle_of_a_moe_block_gives_the_same_bytes(model_type, tiny_family_dir, tmp_path, calib,
                                                                  monkeypatch):
    src = tiny_family_dir(model_type)
    opts = QuantizeOptions(bits=4, group_size=32, init="neuqi", gptq=True, lm_head_bits=8, **OPTS)
    quantize_model(src, tmp_path / "clean", opts, calib_text=calib, progress=False)
    real = pipeline.quantize_linear

    def flaky(W, H, o, name=None, *a, **kw):
        if name == "model.layers.1.mlp.experts.2.up_proj":  # block 1: attention and two experts done
            raise KeyboardInterrupt
        return real(W, H, o, name, *a, **kw)

    monkeypatch.setattr(pipeline, "quantize_linear", flaky)
    with pytest.raises(KeyboardInterrupt):
        quantize_model(src, tmp_path / "r", opts, calib_text=calib, progress=False)
    part = tmp_path / "r.partial"
    from neuqi_export.master_store import shard_name
    from neuqi_export.partial import block_done

    n = json.loads((src / "config.json").read_text())["num_hidden_layers"] + 1  # a shard per block, then the rest
    assert block_done(part, shard_name(1, n)) and not block_done(part, shard_name(2, n))
    monkeypatch.setattr(pipeline, "quantize_linear", real)
    summary = quantize_model(src, tmp_path / "r", opts, calib_text=calib, progress=False)
    assert summary.resumed_blocks == 1 and "lm_head" in summary.per_layer
    assert _sha(tmp_path / "clean") == _sha(tmp_path / "r")
    assert experts.fallback_summary(summary.per_layer).startswith("experts: 8,")
