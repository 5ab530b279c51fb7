"""Command line: ``resmtnet predict|train|evaluate|demo`` (also ``python -m napari_resmtnet``).

Each sub-command lives with its library code; this module only dispatches, so that
``resmtnet --help`` stays fast.
"""
from __future__ import annotations

import sys

COMMANDS = {
    "predict": ("napari_resmtnet.predict_cli", "Detect nodules in scans, write CSV/JSON"),
    "train": ("napari_resmtnet.training", "Train Res-MTNet from a config"),
    "evaluate": ("napari_resmtnet.evaluation", "Evaluate weights on the validation split"),
    "demo": ("napari_resmtnet.demo", "Open napari with the sample CT and detect nodules"),
}


def _usage() -> str:
    lines = ["usage: resmtnet COMMAND [options]", "", "commands:"]
    lines += [f"  {k:<10} {v[1]}" for k, v in COMMANDS.items()]
    return "\n".join(lines)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    cmd, rest = argv[0], argv[1:]
    if cmd not in COMMANDS:
        print(f"resmtnet: unknown command {cmd!r}\n{_usage()}", file=sys.stderr)
        return 2
    import importlib

    module = importlib.import_module(COMMANDS[cmd][0])
    return int(module.main(rest) or 0)


def train_main(argv=None) -> int:
    return main(["train", *(sys.argv[1:] if argv is None else argv)])


def evaluate_main(argv=None) -> int:
    return main(["evaluate", *(sys.argv[1:] if argv is None else argv)])
