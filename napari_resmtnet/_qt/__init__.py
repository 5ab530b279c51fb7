"""Qt parts of the nodule widget (qtpy only). Imported by `napari_resmtnet._widget`."""
