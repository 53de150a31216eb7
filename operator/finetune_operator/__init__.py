"""finetune-operator: FineTuneJob API, sizing, rendering, status and the kopf operator (no torch)."""

__version__ = "0.1.0"
