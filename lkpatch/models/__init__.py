"""Models lkpatch ships. Importing this registers them with timm (``timm.create_model("replknet_31b")``)."""
from .replknet import CONFIGS as REPLKNET_CONFIGS, RepLKNet

__all__ = ["RepLKNet", "REPLKNET_CONFIGS"]
