"""Silence torchao 0.15's start-up line "Skipping import of cpp extensions due to incompatible
torch version ..." (logged by ``torchao/__init__.py`` when torch is not the 2.9.1 its ``_C*.so``
were built against, i.e. with the torch 2.13 this project runs on).

The skipped extensions hold CUDA kernels medtune never calls: the Marlin/tensor-core-tiled int4
and fp6 (quant_llm) matmuls, 2:4 sparse and CUTLASS/MX-FP8 GEMMs. QLoRA's NF4 (torchao.dtypes.
nf4tensor) is pure PyTorch and never touches ``torch.ops.torchao``; GaLore is galore-torch.
Installed at interpreter start by ``medtune_recipes.pth`` (with :mod:`components.recipe_finder`),
so ``tune run`` and ``lm_eval``, which import torchao through torchtune before any medtune code,
are covered too. Only this one message is dropped; torchao's other warnings pass.
"""

import logging

NOTICE = "Skipping import of cpp extensions due to incompatible torch version"


class _DropCppExtensionNotice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(NOTICE)


def install() -> None:
    """Add the filter to the ``torchao`` logger (idempotent)."""
    logger = logging.getLogger("torchao")
    if not any(isinstance(f, _DropCppExtensionNotice) for f in logger.filters):
        logger.addFilter(_DropCppExtensionNotice())
