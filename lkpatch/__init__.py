"""lkpatch: fast depthwise convolution for large-kernel CNNs.

    model = lkpatch.convert_model(model)   # every eligible depthwise conv, same weights

See README.md.
"""
from .functional import depthwise_conv2d
from .modules import DepthwiseConv2d
from .convert import ConversionReport, LayerReport, conversion_report, convert_model, revert_model
from .fuse import fuse_conv_bn
from .deploy import load_checkpoint, reparameterize
from . import models  # registers the RepLKNet models with timm

__version__ = "0.1.0"

__all__ = [
    "depthwise_conv2d", "DepthwiseConv2d", "convert_model", "revert_model", "conversion_report",
    "ConversionReport", "LayerReport", "fuse_conv_bn", "load_checkpoint", "reparameterize", "models", "__version__",
]
