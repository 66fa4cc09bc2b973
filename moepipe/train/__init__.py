"""Training: the loop, metrics and W&B, run provenance, and the `moepipe-train` entry point."""
