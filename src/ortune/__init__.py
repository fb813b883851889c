"""ortune: dataset -> (Q)LoRA fine-tune -> merge -> ONNX (int4) -> evaluation, as DVC stages."""

__version__ = "0.1.0"
