"""The ``resmtnet`` command: ``predict``, ``train``, ``evaluate``, ``demo``, ``figure``.

    resmtnet COMMAND [options]      (also: python -m napari_resmtnet COMMAND ...)
    resmtnet COMMAND --help
    resmtnet --version

Each sub-command's options live with its library code (``predict_cli``, ``training``,
``evaluation``, ``demo``; ``figure`` draws with ``cxr_data``); this module only dispatches,
imports them lazily (so ``resmtnet --help`` and ``--version`` load neither torch nor Qt) and
keeps one convention for all of them:

* errors: one line, ``resmtnet COMMAND: message``, on stderr; never a traceback;
* exit status: 0 done, 1 failed, 2 usage error, 130 interrupted (Ctrl+C).

``resmtnet-train`` and ``resmtnet-evaluate`` are kept as aliases of ``resmtnet train`` and
``resmtnet evaluate``.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from .. import __version__, errors
from .._sample_data import sample_path
from ..training.figure import implant_figure

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130

#: command -> (module with ``main(argv) -> int``, one-line summary)
COMMANDS: dict[str, tuple[str, str]] = {
    "predict": ("napari_resmtnet.cli.predict", "detect and grade nodules in scans; write CSV/JSON"),
    "train": ("napari_resmtnet.training.train", "train Res-MTNet from a JSON config"),
    "evaluate": ("napari_resmtnet.evaluation.evaluate", "validation metrics of the bundled (or given) weights"),
    "demo": ("napari_resmtnet.cli.demo", "open napari with a bundled sample and detect its nodules"),
    "figure": ("napari_resmtnet.cli.main", "draw CT nodules implanted into a chest X-ray (a PNG figure)"),
    "screen": ("napari_resmtnet.cli.screening", "screen an archive (files, DICOMweb) on a Dask cluster; resumable"),
}

#: the data folder when neither --data nor $RESMTNET_DATA is given (next to the checkout)
DEFAULT_DATA = Path("../shared/data")


def usage() -> str:
    lines = [
        "usage: resmtnet COMMAND [options]",
        "       resmtnet COMMAND --help",
        "       resmtnet --version",
        "",
        "Find and grade lung nodules in chest CT and chest X-ray with Res-MTNet.",
        "",
        "commands:",
    ]
    lines += [f"  {name:<10} {summary}" for name, (_, summary) in COMMANDS.items()]
    lines += ["", "exit status: 0 done, 1 failed, 2 usage error, 130 interrupted"]
    return "\n".join(lines)


def error(command: str | None, message: str) -> None:
    """Print the one-line error of ``resmtnet COMMAND`` to stderr."""
    prog = f"resmtnet {command}" if command else "resmtnet"
    print(f"{prog}: {message}", file=sys.stderr)


one_line = errors.one_line


def run_command(command: str, func: Callable[[list[str]], int | None], argv: Sequence[str]) -> int:
    """Call ``func(argv)`` and map whatever it does to the exit-status convention."""
    try:
        code = func(list(argv))
    except SystemExit as e:  # argparse: --help (0) or a usage error (2); sys.exit("message")
        code = e.code
    except KeyboardInterrupt:
        error(command, "interrupted")
        return EXIT_INTERRUPTED
    except MemoryError:
        error(command, "out of memory")
        return EXIT_FAILURE
    except Exception as e:  # a command-line edge: one line, never a traceback
        error(command, one_line(e))
        return EXIT_FAILURE
    if code is None:
        return EXIT_OK
    if not isinstance(code, int):
        error(command, str(code))
        return EXIT_FAILURE
    return code


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args:
        print(usage(), file=sys.stderr)
        return EXIT_USAGE
    command, rest = args[0], args[1:]
    if command in ("-h", "--help", "help"):
        print(usage())
        return EXIT_OK
    if command in ("-V", "--version"):
        print(f"resmtnet (napari-resmtnet) {__version__}")
        return EXIT_OK
    if command not in COMMANDS:
        error(None, f"unknown command {command!r}; expected one of: {', '.join(COMMANDS)} (resmtnet --help)")
        return EXIT_USAGE
    if command == "figure":
        return run_command(command, figure_main, rest)

    def call(sub_argv: list[str]) -> int | None:
        module = importlib.import_module(COMMANDS[command][0])
        return module.main(sub_argv)

    return run_command(command, call, rest)


def train_main(argv: Sequence[str] | None = None) -> int:
    """``resmtnet-train``: alias of ``resmtnet train``."""
    return main(["train", *(sys.argv[1:] if argv is None else argv)])


def evaluate_main(argv: Sequence[str] | None = None) -> int:
    """``resmtnet-evaluate``: alias of ``resmtnet evaluate``."""
    return main(["evaluate", *(sys.argv[1:] if argv is None else argv)])


# -- resmtnet figure ---------------------------------------------------------------------------


def data_folder(flag: str | None) -> Path:
    """The data folder: ``--data``, else ``$RESMTNET_DATA``, else ``../shared/data``."""
    return Path(flag or os.environ.get("RESMTNET_DATA") or DEFAULT_DATA)


def figure_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(
        prog="resmtnet figure",
        description="Draw 8 CT nodules implanted into a chest X-ray above 8 real JSRT nodules (PNG).",
        epilog="Data: --data DIR, else $RESMTNET_DATA, else ../shared/data; it holds ct_nodule_cubes/ "
        "(LUNA16/LIDC cubes with nodules.csv) and, optionally, jsrt/.",
    )
    p.add_argument("--out", default="docs/figures/cxr_implants.png", help="PNG to write (default: %(default)s)")
    p.add_argument("--data", metavar="DIR", help="data folder (default: $RESMTNET_DATA, else ../shared/data)")
    p.add_argument(
        "--radiograph", metavar="FILE", help="radiograph to implant into (default: the bundled NODE21 sample)"
    )
    p.add_argument("--cubes", metavar="DIR", help="CT nodule cubes (default: DATA/ct_nodule_cubes)")
    p.add_argument("--jsrt", metavar="DIR", help="JSRT folder for the real-nodule row (default: DATA/jsrt; '' to omit)")
    a = p.parse_args(argv)

    data = data_folder(a.data)
    cubes = Path(a.cubes) if a.cubes else data / "ct_nodule_cubes"
    if not (cubes / "nodules.csv").is_file():
        error("figure", f"{cubes / 'nodules.csv'} not found; give the data folder with --data DIR or RESMTNET_DATA=DIR")
        return EXIT_FAILURE
    if a.radiograph:
        radiograph = Path(a.radiograph)
    else:
        radiograph = sample_path("cxr")
    if not radiograph.is_file():
        error("figure", f"{radiograph} not found (--radiograph)")
        return EXIT_FAILURE
    jsrt = None if a.jsrt == "" else Path(a.jsrt) if a.jsrt else data / "jsrt"

    path = implant_figure(a.out, radiograph, cubes, jsrt)
    print(f"figure written to {path}")
    return EXIT_OK
