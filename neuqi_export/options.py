"""What a quantize run is asked for (QuantizeOptions: everything that decides the result, checked in one place)
and what it reports (QuantizeSummary)."""
from __future__ import annotations

from dataclasses import dataclass, field

from . import experts as _experts
from .errors import UserError

SUPPORTED_BITS = (2, 3, 4, 8)
INIT_METHODS = ("minmax", "mse", "neuqi_int", "neuqi")
# Methods whose objective uses the calibration diag(H); minmax and mse are data-free by definition.
USES_HDIAG = ("neuqi_int", "neuqi")


@dataclass
class QuantizeOptions:
    """Everything that decides the quantized result (hashed to recognise a resumable run)."""

    bits: int = 4
    group_size: int = 128
    init: str = "neuqi"
    gptq: bool = False
    act_order: bool = True
    nsamples: int = 128
    seqlen: int = 2048
    seed: int = 0
    percdamp: float = 0.01
    calibrate: bool = True  # False: data-free (h ≡ 1, no GPTQ)
    # K-quant-aware mode: {HF linear name: GGUF type}; those linears are fitted and GPTQ'd on the type's
    # own lattice (converters.gguf.lattice) instead of a uniform `bits` grid
    gguf_types: dict | None = None
    # a llama.cpp imatrix file whose per-linear h replaces calibration (data-free otherwise: no GPTQ)
    imatrix: str | None = None
    # quantize the output head too (for tied embeddings: the one shared matrix), at these bits; None keeps it float
    lm_head_bits: int | None = None

    def validate(self) -> None:
        if self.bits not in SUPPORTED_BITS:
            raise UserError(f"--bits {self.bits} is not supported; use one of {', '.join(map(str, SUPPORTED_BITS))}")
        g = self.group_size
        if not (g == -1 or (g > 0 and g & (g - 1) == 0)):
            raise UserError(f"--group-size {g} is not a positive power of two or -1 (per-channel); use e.g. 32, 64, 128 or -1")
        if self.init not in INIT_METHODS:
            raise UserError(f"--init {self.init!r} is unknown; use one of {', '.join(INIT_METHODS)}")
        if self.nsamples < 1 or self.seqlen < 2:
            raise UserError("--nsamples must be >= 1 and --seqlen >= 2")
        if self.imatrix and self.calibrate:
            raise UserError("--imatrix replaces calibration text; pass --no-calib with it (or drop --imatrix)")
        if self.lm_head_bits is not None:
            if self.lm_head_bits not in SUPPORTED_BITS:
                raise UserError(f"--lm-head-bits {self.lm_head_bits} is not supported; use one of "
                                f"{', '.join(map(str, SUPPORTED_BITS))}")
            if self.gguf_types:
                raise UserError("--lm-head-bits does not combine with quantizing on a GGUF type's lattice (--for-gguf, "
                                "or convert --to gguf with --gguf-fit lattice): the type's mixture sets the output "
                                "tensor's type; drop --lm-head-bits, or convert with --gguf-fit master")
        if self.gptq and not self.calibrate:
            raise UserError("--gptq needs calibration text (an imatrix holds only diag(H)); drop --gptq, or "
                            "calibrate instead of --no-calib/--imatrix")


@dataclass
class QuantizeSummary:
    seconds: float
    layers: int
    diag_loss: float  # Σ_layers Σ_j h_j (w_j − ŵ_j)²
    hessian_loss: float  # Σ_layers tr(ΔW H ΔWᵀ)
    resumed_blocks: int = 0
    per_layer: dict = field(default_factory=dict)
    timing: str = ""  # StageTimer.report(): wall time per stage

    def __str__(self) -> str:
        moe = _experts.fallback_summary(self.per_layer)
        return (moe + "\n" if moe else "") + (f"quantized {self.layers} linears in {self.seconds:.1f} s; summed diag-H loss {self.diag_loss:.6g}, "
                f"summed full-H loss {self.hessian_loss:.6g}"
                + (f" (resumed after {self.resumed_blocks} finished blocks)" if self.resumed_blocks else "")
                + (f"\n{self.timing}" if self.timing else ""))
