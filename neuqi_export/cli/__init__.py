"""`neuqi-export` command line: quantize, eval, fetch, export / convert (every registered exporter), distill, demo.

parser.py builds the arguments, commands.py runs them, gguf_policy.py holds what the CLI asks of the GGUF converter
before quantizing, demo.py is the one-command tour, main.py the entry point (one line and exit code 2 on bad input).
This package is the one place where the quantizer, the converters and the runtimes meet.
"""
from .main import main
from .parser import build_parser

__all__ = ["main", "build_parser"]
