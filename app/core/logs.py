"""Silencing known-harmless library noise in every mixq process (CLI, API, worker)."""

import logging
import os
import warnings


def quiet_library_noise() -> None:
    """Known-harmless start-up noise: torchao's GPU-only extensions on CPU, torch.ao deprecation notices."""
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    for name in ("torchao", "torch.utils._pytree"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=UserWarning, module=r"torch\.ao\..*")
    warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"torch\.ao\..*")
    warnings.filterwarnings("ignore", message=".*quantize_per_tensor.*")
    # onnxruntime's quantizer advises pre-processing on the root logger each time it runs.
    logging.getLogger().addFilter(lambda record: "pre-processing before quantization" not in record.getMessage())
