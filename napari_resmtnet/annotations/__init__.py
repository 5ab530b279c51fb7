"""The reader's nodule annotations, Qt- and napari-free: the `NoduleTable` (`table`), review
state and order (`review`), nodule files (`export`, `autosave`), the HTML report (`report`)
and DICOM SR/SEG export (`dicom_export`).

May import the core, `io` and `inference`; never training, evaluation, the CLI or the
napari/Qt edge.
"""
