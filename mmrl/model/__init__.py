"""GGeM-pooled open_clip models: towers, registry and factories, save/load."""
from .describe import ModelDescription, describe_model
from .factory import (
    create_model,
    create_model_and_transforms,
    create_model_from_config,
    create_transforms,
    get_model_config,
    get_tokenizer,
    list_models,
)
from .init_weights import InitReport, init_from_weights
from .io import load_model, read_model_config, save_model
from .vision import PooledVisionTransformer, build_vision_tower

__all__ = [
    "create_model", "create_model_and_transforms", "create_model_from_config", "create_transforms",
    "get_model_config", "get_tokenizer", "list_models", "load_model", "read_model_config", "save_model",
    "PooledVisionTransformer", "build_vision_tower", "ModelDescription", "describe_model",
    "InitReport", "init_from_weights",
]
