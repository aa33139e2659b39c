"""The GGUF tensor types this exporter writes, one registered row (class) per type, as gguf-py's quants.py registers
one class per type: its block, the bits a uniform master grid needs for it, its general.file_type when it is every
linear's --type, llama-quantize's fallback for rows its block does not divide, whether a master's codes can be
stored in it exactly, and how its blocks are fitted and packed (the K-quant-aware mode, lattice.py), how a master's
values are refit into it and how an unquantized tensor (embedding, output head) is stored in it.

The fitting and packing code lives in kquants.py (affine and K types), codebook.py (Q8_0/Q4_0/Q5_0/IQ4_NL), exact.py
(a master's codes as they are) and packers.py (byte layouts); this module only says which type uses which.

Rows are registered in the order the exporter lists them: floats, the float quantizers, the exact types, the K
types, the code books.

Exactness. Q4_1/Q5_1 (affine, w = d*q + m) hold any master whose codes fit their bits (exact_capable). The
symmetric code books Q8_0/Q4_0/Q5_0 (w = d*(q - c)) hold a master's codes only when its zero-points are integers
that keep the shifted codes in range (Q4_0 from a 4-bit master: Z = 8, the midpoint), which NeUQI's float
zero-points almost never are: they try (tries_exact) and otherwise refit on diag(H). IQ4_NL's values are not
uniform, so it always refits.
"""
from __future__ import annotations

import gguf
import numpy as np

from neuqi_export.errors import UserError

from . import codebook, kquants
from .exact import PackedTensor, pack_exact, pack_symmetric_exact, weighted_error, weighted_sums
from .kquants import KSpec
from .packers import (QK, QK_K, fit_q6_k_params, pack_q2_k, pack_q3_k, pack_q4_1, pack_q4_k, pack_q5_1, pack_q5_k,
                      pack_q6_k, quantize_q6_k, quantize_q8_0)

TYPES: dict[str, "GGUFType"] = {}
FROM_FLOAT = "from float (unquantized in the master)"
ROW_CHUNK = 1 << 22  # weights per row chunk of a float tensor's fit: its float64 temporaries stay ~32 MB each


def by_row_chunks(w: np.ndarray, h: np.ndarray, qtype: str, make) -> tuple[np.ndarray, float, float]:
    """(bytes, Σ h err², relative error) of `make(rows)` -> qtype bytes over row chunks of w (rows, n): the same bytes
    as one call (every block fit is independent per row), with the temporaries of one chunk, not of the tensor
    (an embedding's or head's whole-tensor fit peaked at ~8 GiB for 49152 x 4096)."""
    t = gguf.GGMLQuantizationType[qtype]
    step = max(1, ROW_CHUNK // max(w.shape[1], 1))
    parts, err, ref = [], 0.0, 0.0
    for i in range(0, w.shape[0], step):
        wc = w[i:i + step]
        data = make(wc)
        e, r = weighted_sums(wc, gguf.quants.dequantize(data, t), h)
        parts.append(data)
        err, ref = err + e, ref + r
    data = parts[0] if len(parts) == 1 else np.concatenate(parts)
    return data, err, (err / ref if ref > 0 else 0.0)


class GGUFType:
    """One GGUF tensor type; a subclass that names itself is registered in TYPES (one instance)."""

    name: str
    block: int = QK  # a row's length (the input dim) must be a multiple of this
    bits: int  # the widest uniform master grid the type holds (a master with wider codes is refused)
    file_type: gguf.LlamaFileType | None = None  # general.file_type as every linear's --type (None: not a --type)
    fallback: str | None = None  # llama-quantize's type for rows the block does not divide (None: F16)
    embed: bool = False  # offered for the float embedding / output head (--embed-type, --output-type)
    is_float: bool = False  # stores floats, no blocks
    exact_capable: bool = False  # a master's codes fit unchanged (exact.pack_exact)
    tries_exact: bool = False  # the export tries `exact` first and refits when it raises NotRepresentable
    # as every linear's --type, a row the block does not divide is stored in an exact type (as llama-quantize
    # falls back to a legacy type there) instead of F16
    legacy_fallback: bool = False
    # the lattice (K-quant-aware mode): `levels` values per sub-block of `sub_block` weights (0: no lattice mode)
    sub_block: int = 0
    levels: int = 0
    affine: bool = True  # the values are affine in the code (nearest by rounding), else a table (nearest by search)

    def __init_subclass__(cls, **kw):
        super().__init_subclass__(**kw)
        if "name" in cls.__dict__:
            TYPES[cls.name] = cls()

    @property
    def stores_master(self) -> bool:
        """The master's values as they are (exact codes or floats): no fit needed, no --gguf-fit."""
        return self.is_float or self.exact_capable

    def fit(self, w: np.ndarray, h: np.ndarray) -> tuple[tuple, np.ndarray]:
        """Block parameters and codes for w (rows, n) float64 on Σ h (w - ŵ)² (h (n,))."""
        raise NotImplementedError(f"{self.name} has no block fit")

    def pack(self, params: tuple, q: np.ndarray) -> np.ndarray:
        """The type's bytes (rows, row_bytes) from fit's parameters and codes q (rows, n) uint8."""
        raise NotImplementedError(f"{self.name} has no block packer")

    def exact(self, codes, scale, zero, group_size: int, bits: int, hdiag) -> PackedTensor:
        """A master linear's codes unchanged in this type; exact.NotRepresentable when they do not fit."""
        return pack_exact(codes, scale, zero, group_size, bits, hdiag, self)

    def refit_bytes(self, w: np.ndarray, h: np.ndarray) -> np.ndarray:
        return self.pack(*self.fit(w, h))

    def refit(self, w: np.ndarray, hdiag: np.ndarray | None, note: str = "", seed: tuple | None = None) -> PackedTensor:
        """Float values w (rows, n), n divisible by the block, stored in this type, fitted on diag(H) (hdiag; None =
        1). seed: a master's (bits, group_size, scale, zero), used by the K types that can start from it."""
        rows, n = w.shape
        if n % self.block:
            raise ValueError(f"{self.name} needs rows divisible by {self.block}, got {n}")
        h = np.ones(n) if hdiag is None else np.asarray(hdiag, np.float64)
        data, err, rel = by_row_chunks(w, h, self.name, lambda wc: self.refit_bytes(wc, h))
        return PackedTensor(data, self.name, False, err, rel, f"{self.name} refit (diag-H){'; ' + note if note else ''}")

    def from_float(self, w: np.ndarray) -> PackedTensor:
        """An unquantized tensor w (rows, n) float32 (embedding, output head) stored in this type."""
        if w.shape[1] % self.block == 0:
            return self.refit(w, None, FROM_FLOAT)
        raise UserError(f"unknown tensor type {self.name!r}; use one of {', '.join(FLOAT_TYPES[1:])}")

    def _from_float_bytes(self, w: np.ndarray, advice: str, data=None) -> PackedTensor:
        """from_float of the float quantizers: `data` (default gguf-py's min-max quantize) and its error on h = 1."""
        n = w.shape[1]
        if n % self.block:
            raise UserError(f"{self.name} needs a row length divisible by {self.block} (got {n}); {advice}")
        t = gguf.GGMLQuantizationType[self.name]
        make = (lambda wc: gguf.quants.quantize(wc, t)) if data is None else data
        data, err, rel = by_row_chunks(w, np.ones(n), self.name, make)
        return PackedTensor(data, self.name, False, err, rel, FROM_FLOAT)


# ---- floats --------------------------------------------------------------------------------------------------

class F32(GGUFType):
    name, block, bits, file_type, embed, is_float = "F32", 1, 32, gguf.LlamaFileType.ALL_F32, True, True

    def from_float(self, w):
        return PackedTensor(np.asarray(w, np.float32), "F32", True, 0.0, 0.0, "float")


class F16(GGUFType):
    """Linears stored dequantized (the master's values in fp16)."""

    name, block, bits, file_type, embed, is_float = "F16", 1, 16, gguf.LlamaFileType.MOSTLY_F16, True, True

    def from_float(self, w):
        data = w.astype(np.float16)
        if not np.isfinite(data).all():
            raise UserError("a weight exceeds the fp16 range; choose --embed-type/--output-type F32 or Q8_0")
        err, rel = weighted_error(w, data.astype(np.float32), np.ones(w.shape[1]))
        return PackedTensor(data, "F16", False, err, rel, FROM_FLOAT)


# ---- the float quantizers: Q8_0 (a code book: diag-H fit for a linear, llama-quantize's rule for an
# embedding / head) and Q6_K (the plain fit: at 6 bits weighting adds next to nothing) -------------------------

class _Codebook(GGUFType):
    """Per 32 weights one fp16 scale d, w = d * kv[q] (codebook.py), fitted on diag(H)."""

    sub_block, tries_exact = QK, True
    kv: np.ndarray

    @property
    def levels(self) -> int:
        return len(self.kv)

    def fit(self, w, h):
        rows, n = w.shape
        q, d = codebook.fit_codebook_blocks(np.asarray(w, np.float64).reshape(rows, n // QK, QK),
                                            h.reshape(1, n // QK, QK), self.kv)
        return (d,), q.reshape(rows, n)

    def pack(self, params, q):
        return codebook.pack_codebook(self.name, q, params[0])

    def exact(self, codes, scale, zero, group_size, bits, hdiag):
        """The master's codes unchanged when its zero-points allow (exact.pack_symmetric_exact)."""
        return pack_symmetric_exact(codes, scale, zero, group_size, bits, hdiag, self)


class Q8_0(_Codebook):
    """w = d*q, q in -128..127; as a --type (an 8-bit master) fitted on diag(H), as an embedding / output head
    llama-quantize's round-to-nearest (max|w|/127)."""

    name, bits, file_type, embed, kv = "Q8_0", 8, gguf.LlamaFileType.MOSTLY_Q8_0, True, np.arange(-128, 128.0)

    def from_float(self, w):
        return self._from_float_bytes(w, "choose F16", quantize_q8_0)


class Q6_K(GGUFType):
    name, block, bits, fallback, embed, sub_block, levels = "Q6_K", QK_K, 6, "Q8_0", True, 16, 64

    def fit(self, w, h):
        sc, d16, q = fit_q6_k_params(w)
        return (sc, d16), q

    def pack(self, params, q):
        return pack_q6_k(q, *params)

    def refit_bytes(self, w, h):
        return quantize_q6_k(w)

    def from_float(self, w):
        return self._from_float_bytes(w, "choose Q8_0 or F16", quantize_q6_k)


# ---- exact: 32-weight affine blocks w = d*q + m that hold a master's codes unchanged ---------------------------

class _Affine(GGUFType):
    exact_capable, tries_exact, embed, sub_block = True, True, True, QK

    def fit(self, w, h):
        rows, n = w.shape
        q, d16, m16, _ = kquants.fit_affine_blocks(np.asarray(w, np.float64).reshape(rows, n // QK, QK),
                                                   h.reshape(1, n // QK, QK), self.levels)
        return (d16, m16), q.reshape(rows, n)

    def refit(self, w, hdiag, note="", seed=None):
        return kquants.refit_legacy(self, w, hdiag, note)

    def from_float(self, w):
        return self._from_float_bytes(w, "choose F16")  # min-max round-to-nearest, as llama-quantize without imatrix


class Q4_1(_Affine):
    name, bits, file_type, levels = "Q4_1", 4, gguf.LlamaFileType.MOSTLY_Q4_1, 16

    def pack(self, params, q):
        return pack_q4_1(q, *params)


class Q5_1(_Affine):
    name, bits, file_type, levels = "Q5_1", 5, gguf.LlamaFileType.MOSTLY_Q5_1, 32

    def pack(self, params, q):
        return pack_q5_1(q, *params)


# ---- K types: 256-weight super-blocks of sub-blocks with integer scales (kquants.py) ---------------------------

class _K(GGUFType):
    block = QK_K
    k: KSpec

    def fit(self, w, h):
        return kquants.fit_k_params(w, h, self.k)

    def refit(self, w, hdiag, note="", seed=None):
        bits, group_size, scale, zero = seed or (8, w.shape[1], None, None)
        return kquants.refit_k(self, w, hdiag, bits, group_size, scale, zero)


class Q5_K(_K):
    """Written by the presets only; refit without a master seed."""

    name, bits, fallback, sub_block, levels = "Q5_K", 5, "Q5_1", 32, 32
    k = KSpec(32, 32, 5, 63, True)

    def pack(self, params, q):
        return pack_q5_k(q, *params)

    refit = GGUFType.refit  # a fit of the values alone (kquants' steps, no seed from the master)


class Q4_K(_K):
    name, bits, file_type, fallback, legacy_fallback = "Q4_K", 4, gguf.LlamaFileType.MOSTLY_Q4_K_S, "Q5_0", True
    sub_block, levels, k = 32, 16, KSpec(32, 16, 4, 63, True)

    def pack(self, params, q):
        return pack_q4_k(q, *params)


class Q3_K(_K):
    """Signed sub-scales -32..31, codes -4..3 (stored + 4), no min."""

    name, bits, file_type, fallback, legacy_fallback = "Q3_K", 3, gguf.LlamaFileType.MOSTLY_Q3_K_S, "IQ4_NL", True
    sub_block, levels, k = 16, 8, KSpec(16, 8, 3, 31, False)

    def pack(self, params, q):
        sc, _, d16, _ = params
        return pack_q3_k(q, sc, d16)


class Q2_K(_K):
    name, bits, file_type, fallback, legacy_fallback = "Q2_K", 2, gguf.LlamaFileType.MOSTLY_Q2_K, "IQ4_NL", True
    sub_block, levels, k = 16, 4, KSpec(16, 4, 2, 15, True)

    def pack(self, params, q):
        return pack_q2_k(q, *params)


# ---- code books: per 32 weights one fp16 scale d, w = d * kv[q] (codebook.py; Q8_0 is one too, above) ---------

class Q4_0(_Codebook):
    name, bits, file_type, embed = "Q4_0", 4, gguf.LlamaFileType.MOSTLY_Q4_0, True
    kv = np.arange(-8, 8, dtype=np.float64)


class Q5_0(_Codebook):
    name, bits, file_type, embed = "Q5_0", 5, gguf.LlamaFileType.MOSTLY_Q5_0, True
    kv = np.arange(-16, 16, dtype=np.float64)


class IQ4_NL(_Codebook):
    name, bits, file_type, embed = "IQ4_NL", 4, gguf.LlamaFileType.MOSTLY_IQ4_NL, True
    kv, affine = codebook.KVALUES_IQ4NL, False  # values not affine in the code: never a master's grid, always refit


# ---- views of the rows ---------------------------------------------------------------------------------------

SINGLE_TYPES = tuple(t for t, row in TYPES.items() if row.file_type is not None)  # export --type TYPE
FLOAT_TYPES = ("auto", *(t for t, row in TYPES.items() if row.embed))  # --embed-type / --output-type


def head_type(base: str, n_embd: int) -> str:
    """llama-quantize's type for output.weight (and a tied token_embd) when the linears' type is `base`: Q8_0 when
    n_embd is not a multiple of base's block or base is Q8_0, else Q6_K, then Q6_K's fallback (Q8_0 when n_embd is
    not a multiple of 256)."""
    t = "Q8_0" if n_embd % TYPES[base].block or base == "Q8_0" else "Q6_K"
    return fallback_type(t, n_embd)


def fallback_type(qtype: str, row_len: int) -> str:
    """The type llama-quantize actually uses for a row of `row_len` (falls back when the block does not divide it)."""
    row = TYPES[qtype]
    if row_len % row.block == 0:
        return qtype
    if row.fallback is None:
        return "F16"
    return row.fallback if row_len % TYPES[row.fallback].block == 0 else "F16"
