"""ortune: dataset -> (Q)LoRA fine-tune -> merge -> ONNX (int4) -> evaluation, as DVC stages."""

import logging as _logging

__version__ = "0.1.0"


class _NoKernelsHint(_logging.Filter):
    """PEFT imports bitsandbytes whenever it is installed, so every stage that loads an adapter does
    (plain LoRA included). On CPUs with AVX512-BF16, bitsandbytes' import then tries the optional
    `kernels` package (a faster nf4 CPU matmul fetched from the Hugging Face Hub) and, without it,
    warns and uses its built-in kernel. The hint to install `kernels` is wrong here: it would make
    every import attempt a hub download, which fails offline. Only that one message is dropped."""

    def filter(self, record: _logging.LogRecord) -> bool:
        return "kernels-community" not in str(record.msg)


# installed on import of ortune, which every stage does before anything imports bitsandbytes
_logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(_NoKernelsHint())
