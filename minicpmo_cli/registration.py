"""Register our classes with transformers' Auto classes (idempotent).

The official ``config.json``/``tokenizer_config.json``/``preprocessor_config.json`` carry ``auto_map`` entries
that point at remote code. transformers uses a locally registered class instead, without asking for
``trust_remote_code``, when one is registered for the model type (``minicpmo``) and for the class names the
files give (``MiniCPMOTokenizerFast``, ``MiniCPMOProcessor``, ``MiniCPMVImageProcessor``).
"""

from __future__ import annotations

import logging

logger = logging.getLogger(__name__)

_DONE = False


def register() -> None:
    """Register config, model, tokenizer, processor and image processor; safe to call many times."""
    global _DONE
    if _DONE:
        return
    from transformers import (
        AutoConfig,
        AutoModel,
        AutoModelForCausalLM,
        AutoProcessor,
        AutoTokenizer,
    )

    from minicpmo_cli.generation.guide import MiniCPMO
    from minicpmo_cli.model.config import ConditionalChatTTSConfig, MiniCPMOConfig
    from minicpmo_cli.processing.processor import MiniCPMOProcessor
    from minicpmo_cli.processing.tokenizer import MiniCPMOTokenizerFast

    AutoConfig.register("minicpmo", MiniCPMOConfig, exist_ok=True)
    AutoConfig.register("conditional_chattts", ConditionalChatTTSConfig, exist_ok=True)
    AutoModel.register(MiniCPMOConfig, MiniCPMO, exist_ok=True)
    AutoModelForCausalLM.register(MiniCPMOConfig, MiniCPMO, exist_ok=True)
    AutoTokenizer.register(MiniCPMOConfig, tokenizer_class=MiniCPMOTokenizerFast, exist_ok=True)
    AutoProcessor.register(MiniCPMOConfig, MiniCPMOProcessor, exist_ok=True)
    _register_image_processor(MiniCPMOConfig)
    _DONE = True


def _register_image_processor(config_class) -> None:
    try:
        from transformers import AutoImageProcessor

        from minicpmo_cli.processing.image import MiniCPMVImageProcessor
    except ImportError as exc:  # vision processing is optional for text-only use
        logger.debug("image processor not registered: %s", exc)
        return
    try:
        AutoImageProcessor.register(
            config_class, image_processor_classes={"pil": MiniCPMVImageProcessor}, exist_ok=True
        )
    except ValueError as exc:  # transformers 5.x accepts only BaseImageProcessor subclasses here
        logger.debug("image processor not registered with AutoImageProcessor: %s", exc)
