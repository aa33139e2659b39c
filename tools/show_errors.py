#!/usr/bin/env python3
"""Runs `neuqi-export` on each kind of bad input and prints the exit code and the one-line message.

    python tools/show_errors.py
"""
from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
from pathlib import Path

from safetensors.torch import load_file, save_file

from neuqi_export.assets import fetch_assets


def main() -> None:
    assets = fetch_assets()
    tmp = Path(tempfile.mkdtemp())
    model = assets.model_dir

    def variant(name, edit):
        d = tmp / name
        shutil.copytree(model, d)
        edit(d)
        return d

    def no_weights(d):
        for f in d.glob("*.safetensors"):
            f.unlink()

    def gpt2(d):
        cfg = json.loads((d / "config.json").read_text())
        cfg["model_type"] = "gpt2"
        (d / "config.json").write_text(json.dumps(cfg))

    def nan(d):
        f = next(d.glob("*.safetensors"))
        sd = load_file(str(f))
        sd["model.layers.3.mlp.up_proj.weight"][0, 0] = float("nan")
        save_file(sd, str(f), metadata={"format": "pt"})

    (tmp / "empty.txt").write_text("\n")
    (tmp / "short.txt").write_text("A short text.")
    (tmp / "exists").mkdir()
    calib = ["--calib", str(assets.calib_text), "--nsamples", "2", "--seqlen", "64"]
    cases = {
        "model dir missing": ["quantize", tmp / "nope", "-o", tmp / "o"],
        "model dir without weights": ["quantize", variant("nw", no_weights), "-o", tmp / "o"],
        "unsupported architecture": ["quantize", variant("gpt2", gpt2), "-o", tmp / "o"],
        "bits not supported": ["quantize", model, "-o", tmp / "o", "--bits", "5"],
        "bad group size": ["quantize", model, "-o", tmp / "o", "--group-size", "100"],
        "NaN in a weight": ["quantize", variant("nan", nan), "-o", tmp / "o", *calib],
        "calibration text missing": ["quantize", model, "-o", tmp / "o", "--calib", tmp / "none.txt"],
        "calibration text empty": ["quantize", model, "-o", tmp / "o", "--calib", tmp / "empty.txt"],
        "calibration text too short": ["quantize", model, "-o", tmp / "o", "--calib", tmp / "short.txt"],
        "output exists": ["quantize", model, "-o", tmp / "exists", *calib],
        "not a master (export)": ["export", model, "--to", "gguf", "-o", tmp / "x.gguf"],
    }
    for what, argv in cases.items():
        r = subprocess.run(["neuqi-export", *map(str, argv), "--quiet"] if argv[0] == "quantize" else
                           ["neuqi-export", *map(str, argv)], capture_output=True, text=True)
        leftovers = sorted(p.name for p in tmp.iterdir() if p.name.startswith("o"))
        print(f"- {what}: exit {r.returncode}: `{r.stderr.strip()}`" + (f" LEFTOVER {leftovers}" if leftovers else ""))
    shutil.rmtree(tmp)


if __name__ == "__main__":
    main()
