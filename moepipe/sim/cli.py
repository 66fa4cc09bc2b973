"""Old import path of `moepipe-sim`, kept so `python -m moepipe.sim.cli` and
`from moepipe.sim.cli import run` still work; the application lives in moepipe/cli/sim.py.

The one upward import in moepipe.sim (listed in tests/test_layers.py's exceptions)."""
from moepipe.cli.sim import expert_load, main, make_routing, run, summary_line

__all__ = ["expert_load", "main", "make_routing", "run", "summary_line"]

if __name__ == "__main__":
    main()
