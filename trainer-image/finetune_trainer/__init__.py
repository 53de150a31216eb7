"""finetune-trainer: what runs inside every training pod (and `finetune run --local`)."""

__version__ = "0.1.0"
