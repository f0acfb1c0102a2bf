"""mmrl: multi-modal image-text representation learning with GGeM-pooled Vision Transformers."""
__version__ = "0.1.0"

from .model import (  # noqa: E402  (registers mmrl's model configs with open_clip)
    PooledVisionTransformer,
    create_model,
    create_model_and_transforms,
    describe_model,
    get_model_config,
    get_tokenizer,
    list_models,
    load_model,
    save_model,
)
from .pooling import GGeM, build_pool, ggem, list_pools  # noqa: E402

__all__ = [
    "__version__", "create_model", "create_model_and_transforms", "describe_model", "get_model_config", "get_tokenizer",
    "list_models", "load_model", "save_model", "PooledVisionTransformer", "GGeM", "ggem", "build_pool", "list_pools",
]
