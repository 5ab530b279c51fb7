"""``python -m napari_resmtnet COMMAND ...``: the same as ``resmtnet COMMAND ...``."""

from .cli.main import main

if __name__ == "__main__":
    raise SystemExit(main())
