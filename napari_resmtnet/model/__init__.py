"""Res-MTNet model: network, joint loss, output-grid constants (`config`).

Imports torch. May import the core and `io` only.
"""

from .network import PATCH, STRIDE, ResMTNet, ResMTNetConfig, centre_patches, decode, malignancy_tta

__all__ = ["ResMTNet", "ResMTNetConfig", "decode", "malignancy_tta", "centre_patches", "STRIDE", "PATCH"]
