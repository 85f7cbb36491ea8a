"""The DualVGR network (teacher and student of VQAKD), its losses, and original-checkpoint loading."""

from model.dualvgr import DualVGR, DualVGROutput, LayerOutput
from model.settings import ModelConfig

__all__ = ["DualVGR", "DualVGROutput", "LayerOutput", "ModelConfig"]
