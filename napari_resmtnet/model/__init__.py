"""Res-MTNet model: network, joint loss."""
from .network import PATCH, STRIDE, ResMTNet, ResMTNetConfig, centre_patches, decode, malignancy_tta

__all__ = ["ResMTNet", "ResMTNetConfig", "decode", "malignancy_tta", "centre_patches", "STRIDE", "PATCH"]
