"""`python -m neuqi_export ...` (what `torchrun -m neuqi_export quantize ...` runs): the `neuqi-export` command."""
import sys

from .cli.main import main

sys.exit(main())
