"""Training Res-MTNet: the training loop (`train`), CT and radiograph data (`datasets`,
`readers`, `cxr_data`), augmentation (`augment`), whole-scan negatives (`wholescan`), the
false-positive reduction head (`fpr`) and the implant figure (`figure`).

May import the core, `io`, `model` and `inference`; never annotations, evaluation, the CLI
or the napari/Qt edge.
"""
