"""Applications on top of every other layer: command-line programs (`moepipe-sim`).

Nothing below imports from here (tests/test_layers.py)."""
