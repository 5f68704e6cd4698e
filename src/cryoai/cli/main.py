"""The ``cryoai`` command: an explicit list of subcommands, each a module with add_args/main."""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from .. import __version__
from ..errors import CryoaiError

COMMANDS = {
    "simulate": "cryoai.cli.simulate",
    "info": "cryoai.cli.info",
    "downsample": "cryoai.cli.downsample",
    "fsc": "cryoai.cli.fsc",
    "train": "cryoai.cli.train",
    "predict-poses": "cryoai.cli.predict_poses",
    "evaluate": "cryoai.cli.evaluate",
    "analyze": "cryoai.cli.analyze",
    "symmetry-expand": "cryoai.cli.symmetry_expand",
    "report": "cryoai.cli.report",
    "demo": "cryoai.cli.demo",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cryoai",
        description="Amortized ab initio reconstruction of cryo-EM maps and poses (cryoAI).",
    )
    parser.add_argument("--version", action="version", version=f"cryoai {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, module_name in COMMANDS.items():
        module = importlib.import_module(module_name)
        doc = (module.__doc__ or "").strip()
        p = sub.add_parser(name, help=doc.splitlines()[0] if doc else None, description=doc,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        module.add_args(p)
        p.set_defaults(_main=module.main)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run ``cryoai``; returns the exit status (0 on success, 2 on a reported error)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "_main", None):
        parser.print_help()
        return 1
    try:
        result = args._main(args)
        sys.stdout.flush()  # a closed pipe shows here, not in the flush at interpreter exit
    except CryoaiError as exc:
        print(f"cryoai {args.command}: error: {_one_line_message(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"cryoai {args.command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # The reader went away (``cryoai info x.star | head``): stop quietly, as a tool killed
        # by SIGPIPE would.
        _silence_stdout()
        return 128 + 13
    return int(result or 0)


def _one_line_message(exc: BaseException) -> str:
    """The message of ``exc`` on one line. An error raised in a DataLoader worker arrives with
    the worker's traceback inside its message; only its last line (the original message) is
    kept.
    """
    text = str(exc).strip()
    if "Traceback" in text:
        last = text.splitlines()[-1].strip()
        _, sep, rest = last.partition("Error: ")
        text = rest if sep else last
    return " ".join(text.split())


def _silence_stdout() -> None:
    """Point stdout at /dev/null so that the final flush at exit does not raise again."""
    try:
        fd = sys.stdout.fileno()
    except (AttributeError, OSError, ValueError):
        return  # not a real file (e.g. captured in tests): nothing will be flushed to a pipe
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, fd)
    finally:
        os.close(devnull)


if __name__ == "__main__":
    sys.exit(main())
