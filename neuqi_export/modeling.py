"""Loading models: the original HF directory, and a master checkpoint as a dequantized transformers model."""
from __future__ import annotations

import copy

import torch

from .arch import arch_for, read_model_dir
from .errors import UserError
from .master import QUANT_METHOD, MasterCheckpoint


def load_hf_model(model_dir, dtype=torch.float32):
    """(model, tokenizer, config dict) for a local HF directory, checked for a supported architecture."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    path, config, _ = read_model_dir(model_dir)
    hf_logging.disable_progress_bar()  # our own progress bars only; keeps stderr to one line on errors
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype)
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    return model, tokenizer, config


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
    arch_for(cfg.get("model_type", "?"))
    hf_config = AutoConfig.for_model(**cfg)
    model = AutoModelForCausalLM.from_config(hf_config, dtype=dtype)
    state = master.dequantized_state_dict(dtype)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if getattr(hf_config, "tie_word_embeddings", False):
        model.tie_weights()
        missing = [k for k in missing if k != "lm_head.weight"]
    if missing or unexpected:
        raise UserError(f"master checkpoint does not match its config (missing {missing[:3]}, unexpected {unexpected[:3]}); re-run quantize")
    model.eval()
    return model
