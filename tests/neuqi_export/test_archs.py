"""The family registry against transformers' own models: every fact it states holds for a tiny model of
the family, and the pipeline's captured block arguments reproduce the model's forward."""
import pytest
import torch
from model_factory import build_model, families, tiny_config

from neuqi_export.archs import REGISTRY, family_for, get_blocks
from neuqi_export.errors import UserError
from neuqi_export.pipeline import capture_block_inputs

VOCAB = 96


@pytest.fixture(scope="module", params=families())
def tiny(request):
    torch.manual_seed(0)
    return request.param, build_model(request.param, VOCAB)


def test_unknown_model_type_names_the_supported_ones():
    with pytest.raises(UserError, match=r"unsupported architecture 'gpt_bigcode'.*gemma3_text.*qwen3"):
        family_for({"model_type": "gpt_bigcode"})
    assert set(REGISTRY) >= {"llama", "mistral", "qwen2", "qwen3", "gemma3_text", "gemma2", "phi3", "granite",
                             "smollm3", "olmo2"}


def test_linears_and_norms_cover_every_block_parameter(tiny):
    model_type, model = tiny
    fam = family_for(model_type)
    cfg = model.config.to_dict()
    block = get_blocks(model, fam)[0]
    linears = {n for n, m in block.named_modules() if isinstance(m, torch.nn.Linear)}
    assert set(fam.linear_names) == linears  # every linear is quantized, in some subset
    sd = model.state_dict()
    assert set(fam.norm_names(cfg)) <= set(sd)
    norms_in_block = {n.rsplit(".", 1)[0] for n, p in block.named_parameters() if p.ndim == 1 and "norm" in n}
    assert set(fam.norms.present().values()) == norms_in_block
    for fused, parts in fam.fused.items():
        assert sum(rows for _, rows in parts(cfg)) == block.get_submodule(fused).out_features


def test_layer_attention_reads_windows_rope_and_nope_layers():
    g3 = family_for("gemma3_text").layer_attention(tiny_config("gemma3_text", VOCAB).to_dict())
    assert [a.window for a in g3] == [8, 8, None]
    assert [a.rope["rope_theta"] for a in g3] == [10000.0, 10000.0, 1000000.0]
    s3 = family_for("smollm3").layer_attention(tiny_config("smollm3", VOCAB).to_dict())
    assert [a.rope is None for a in s3] == [False, False, False, True]
    assert all(a.window is None for a in family_for("llama").layer_attention(tiny_config("llama", VOCAB).to_dict()))


@torch.no_grad()
def test_captured_block_arguments_reproduce_the_forward(tiny):
    """Blocks run one after another on the captured inputs and per-block arguments give the model's own final
    hidden states: a sliding-window layer gets its window's mask, a full layer the full one."""
    model_type, model = tiny
    fam = family_for(model_type)
    blocks = get_blocks(model, fam)
    ids = torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(1))
    inputs, kwargs = capture_block_inputs(model, blocks, ids, "cpu")
    assert len(inputs) == 2 and len(kwargs) == len(blocks)
    norm = model.get_submodule(fam.final_norm)
    for w in range(2):
        x = inputs[w]
        for k, block in enumerate(blocks):
            x = block(x, **kwargs[k])
        want = model.model(input_ids=ids[w:w + 1], use_cache=False).last_hidden_state
        torch.testing.assert_close(norm(x), want, rtol=0, atol=0)
    if fam.layer_attention(model.config.to_dict())[0].window is not None:  # the masks differ where windows do
        full = [k for k, a in enumerate(fam.layer_attention(model.config.to_dict())) if a.window is None][0]
        a, b = kwargs[0]["attention_mask"], kwargs[full]["attention_mask"]
        assert a is not None and (b is None or not torch.equal(a, b))
