"""The ``resmtnet`` command line: the dispatcher (`main`) and its commands (`predict`,
`demo`, `screening`; ``train``, ``evaluate`` and ``figure`` live with their code).

The top layer: may import any other part of the package, napari and Qt only inside
functions (``# lazy:``).
"""
