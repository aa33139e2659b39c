"""Scoring of tools/onnx_compare.py: onnxruntime sessions for our decoders and other tools' (onnxruntime-genai's
builder), prefill/decode tokens per second, and an artifact's weight bytes.

Importing this module imports numpy, onnx, onnxruntime and torch: tools/onnx_compare.py imports it only after
it has set OMP_NUM_THREADS from its --threads.
"""
from __future__ import annotations

import statistics
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch

from runtimes.onnxruntime import _PAST, OnnxRuntimeScorer, _model_file

MODEL_FILES = ("model.onnx", "model.onnx.data")


class _FeedFilter:
    """An InferenceSession that drops feeds the graph does not declare (e.g. position_ids)."""

    def __init__(self, session):
        self._s = session
        self._names = {i.name for i in session.get_inputs()}

    def run(self, output_names, feed, *a, **kw):
        return self._s.run(output_names, {k: v for k, v in feed.items() if k in self._names}, *a, **kw)

    def __getattr__(self, name):
        return getattr(self._s, name)


class ExternalScorer(OnnxRuntimeScorer):
    """OnnxRuntimeScorer for decoders written by other tools: same past_key_values.N / present.N names, but
    position_ids may be absent (onnxruntime-genai's builder computes positions inside GroupQueryAttention) and
    the KV head dim may be symbolic (taken from genai_config.json's head_size or the HF config)."""

    def __init__(self, path, n_threads: int, head_dim: int):
        self.path = _model_file(path)
        so = ort.SessionOptions()
        so.intra_op_num_threads = int(n_threads)
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        sess = ort.InferenceSession(str(self.path), so, providers=["CPUExecutionProvider"])
        self.session = _FeedFilter(sess)
        self.inputs = {i.name: i for i in sess.get_inputs()}
        self.past_names = sorted((n for n in self.inputs if _PAST.match(n)),
                                 key=lambda n: (int(_PAST.match(n).group(1)), _PAST.match(n).group(2)))
        self.n_layers = len(self.past_names) // 2
        k0 = self.inputs[self.past_names[0]]
        self.kv_heads = int(k0.shape[1])
        self.head_dim = k0.shape[3] if isinstance(k0.shape[3], int) else int(head_dim)
        self.dtype = np.float16 if "float16" in k0.type else np.float32
        self.outputs = [o.name for o in sess.get_outputs()]
        self.n_vocab = int(sess.get_outputs()[0].shape[-1])


def open_scorer(path: Path, head_dim: int, threads: int):
    names = {i.name for i in onnx.load(str(_model_file(path)), load_external_data=False).graph.input}
    if "position_ids" in names:
        return OnnxRuntimeScorer(path, n_threads=threads, providers=["CPUExecutionProvider"])
    return ExternalScorer(path, threads, head_dim)


def speed(scorer, window: torch.Tensor, args, passes: int = 2) -> dict:
    """Prefill tokens/s (best of args.repeats on args.prefill_len tokens) and decode tokens/s (median step of
    `passes` x args.decode_tokens greedy steps after args.decode_prompt tokens)."""
    ids = window[: args.prefill_len].numpy()[None]
    scorer.logits(ids)  # warm-up
    t = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        scorer.logits(ids)
        t.append(time.perf_counter() - t0)
    prefill = ids.shape[1] / min(t)

    prompt = window[: args.decode_prompt].numpy()[None]
    steps = []
    for _ in range(passes):
        logits, past = scorer.step(prompt, scorer._empty_past(1), 0)
        n = prompt.shape[1]
        for _ in range(args.decode_tokens):
            tok = np.array([[int(np.argmax(logits[0, -1]))]], dtype=np.int64)
            t0 = time.perf_counter()
            logits, past = scorer.step(tok, past, n)
            steps.append(time.perf_counter() - t0)
            n += 1
    return {"prefill_tok_s": prefill, "prefill_len": int(ids.shape[1]), "decode_tok_s": 1.0 / statistics.median(steps),
            "decode_prompt": int(prompt.shape[1]), "decode_tokens": args.decode_tokens}


def weight_bytes(d: Path) -> int:
    d = Path(d)
    files = [d / f for f in MODEL_FILES] if d.is_dir() else [d]
    return sum(f.stat().st_size for f in files if f.is_file())
