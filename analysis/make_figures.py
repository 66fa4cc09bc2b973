"""Redraw every figure whose results file exists (results/fig_*.json, results/bench_sim.json)
into figures/, without running anything:

    python analysis/make_figures.py [--results results] [--figures figures]
"""
from __future__ import annotations

import argparse
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from analysis.figures import draw_all  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--results", default=os.path.join(ROOT, "results"))
    ap.add_argument("--figures", default=os.path.join(ROOT, "figures"))
    args = ap.parse_args()
    for path in draw_all(args.results, args.figures):
        print(path)


if __name__ == "__main__":
    main()
