"""Command-line entry points: ``cke`` and ``ckecli``."""
