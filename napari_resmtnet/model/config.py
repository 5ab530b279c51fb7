"""Constants of the network's output grid, shared by the network and its loss (so neither
imports the other for them)."""

#: Output stride of the detection heads: one output cell per STRIDE input voxels per axis.
STRIDE = 4
