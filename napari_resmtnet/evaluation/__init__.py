"""Evaluating trained weights on the validation split (`evaluate`: ``resmtnet evaluate``).

May import everything below it: the core, `io`, `model`, `inference`, `annotations` and
`training` (its data and split); never the CLI or the napari/Qt edge.
"""
