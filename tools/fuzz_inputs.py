"""Fuzz every kind of file the toolkit reads, kill its runs at random points, fill its disk, run it twice on one
output (issue 23), and write docs/RELIABILITY.md. The harness lives in tools/fuzz/ (see its __init__).

    PYTHONPATH=$PWD python tools/fuzz_inputs.py [--kinds config,gguf] [--sections inputs,kill,disk,lock]
        [--kill-trials 4] [--doc docs/RELIABILITY.md]
"""
from __future__ import annotations

import sys
from pathlib import Path

if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from tools.fuzz.main import main

    raise SystemExit(main())
