"""Model definitions and the loader that turns a checkpoint into a ready model."""

from pagoda.models.config import ModelConfig
from pagoda.models.registry import model_class

__all__ = ["ModelConfig", "model_class"]
