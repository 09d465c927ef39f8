"""evip: Endogenous Visual Pre-training (Mono-InternVL) framework."""
__version__ = "0.1.0"
