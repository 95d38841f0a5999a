"""The command line every benchmark script in bench/ shares: ``--device cpu|cuda`` and ``--out PATH``."""
from __future__ import annotations

import argparse
from pathlib import Path

import torch


def bench_parser(doc: str | None) -> argparse.ArgumentParser:
    """An argument parser with ``--device`` (cpu | cuda) and ``--out`` (the JSON to write); scripts add
    their own options to it and call :func:`parse_bench_args`."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--out", type=Path, default=None, help="JSON path (default bench/results/<paper_id>_<device>.json)")
    return ap


def parse_bench_args(ap: argparse.ArgumentParser, argv=None) -> argparse.Namespace:
    """Parse, and stop with a clear message when ``--device cuda`` is asked for without a CUDA device."""
    args = ap.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda needs a CUDA device")
    return args
