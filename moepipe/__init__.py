"""moepipe: MoE transformers trained with pipeline x expert x data parallelism, placed dynamically."""
__version__ = "0.1.0"
