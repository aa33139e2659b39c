"""Loading models: the original HF directory, and a master checkpoint as a dequantized transformers model."""
from __future__ import annotations

import copy

import torch

from .archs import family_for, read_model_dir
from .errors import UserError
from .experts import fuse_state_dict
from .master import QUANT_METHOD, MasterCheckpoint


def load_hf_model(model_dir, dtype=torch.float32):
    """(model, tokenizer, config dict) for a local HF directory, checked for a supported architecture."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    path, config, _ = read_model_dir(model_dir)
    hf_logging.disable_progress_bar()  # our own progress bars only; keeps stderr to one line on errors
    try:
        model, info = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype, output_loading_info=True)
    except Exception as exc:  # noqa: BLE001 - transformers' many error types for weights that do not fit
        raise UserError(f"the weights in '{path}' do not fit its config.json ({type(exc).__name__}: "
                        f"{str(exc).strip().splitlines()[0][:160]}); re-download the model") from None
    bad = {k: v for k, v in info.items() if k in ("missing_keys", "unexpected_keys", "mismatched_keys") and v}
    if bad:
        what, names = next(iter(bad.items()))
        raise UserError(f"the weights in '{path}' do not match its config.json ({what.replace('_', ' ')}: "
                        f"{', '.join(map(str, sorted(names, key=str)[:3]))}); re-download the model's files of one revision")
    model.eval()
    return model, load_tokenizer(path), config


def load_tokenizer(model_dir):
    """The tokenizer of a local HF directory; UserError naming it when its files are missing or damaged."""
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(model_dir))
    except Exception as exc:  # noqa: BLE001 - tokenizers' and transformers' many error types
        raise UserError(f"the tokenizer files in '{model_dir}' (tokenizer.json, tokenizer_config.json) cannot be loaded "
                        f"({type(exc).__name__}: {str(exc).strip().splitlines()[0][:120] if str(exc).strip() else ''}); "
                        "re-download them") from None
    if isinstance(tok, bool) or not callable(tok):
        raise UserError(f"'{model_dir}' has no usable tokenizer (tokenizer.json); re-download it")
    return tok


def float_master(model_dir) -> MasterCheckpoint:
    """The HF model's own weights (float32) as a master with no quantized linear: the exporters' float reference."""
    from pathlib import Path

    model, _, config = load_hf_model(model_dir)
    sd = {k: v.detach().to(torch.float32).cpu() for k, v in model.state_dict().items()}
    cfg = dict(config, quantization_config={"quant_method": QUANT_METHOD, "calibrated": False})
    return MasterCheckpoint(config=cfg, linears={}, tensors=sd, tokenizer_dir=Path(model_dir))


def check_finite_weights(model) -> None:
    """UserError naming the first parameter that holds NaN or Inf."""
    for name, p in model.named_parameters():
        if p.is_floating_point() and not torch.isfinite(p).all():
            raise UserError(f"weight '{name}' contains NaN/Inf; repair or re-download the model before quantizing")


def master_to_hf(master: MasterCheckpoint, dtype=torch.float32):
    """A transformers CausalLM whose weights are the master's dequantized values (for evaluation)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = copy.deepcopy(master.config)
    cfg.pop("quantization_config", None)
    family_for(cfg)
    hf_config = AutoConfig.for_model(**cfg)
    model = AutoModelForCausalLM.from_config(hf_config, dtype=dtype)
    state = fuse_state_dict(master.dequantized_state_dict(dtype))  # per-expert records -> fused 3-D experts
    missing, unexpected = model.load_state_dict(state, strict=False)
    if getattr(hf_config, "tie_word_embeddings", False):
        model.tie_weights()
        missing = [k for k in missing if k != "lm_head.weight"]
    if missing or unexpected:
        raise UserError(f"master checkpoint does not match its config (missing {missing[:3]}, unexpected {unexpected[:3]}); re-run quantize")
    model.eval()
    return model
