"""Res-MTNet model: network, joint loss."""
from .network import STRIDE, ResMTNet, ResMTNetConfig, decode, malignancy_at

__all__ = ["ResMTNet", "ResMTNetConfig", "decode", "malignancy_at", "STRIDE"]
