"""The `tibia-recon` command: one subcommand per job, each registered by the module that does it."""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from . import PROCESS_ENVIRONMENT, PROCESS_SWITCH_INTERVAL_S, __version__

os.environ.update({k: v for k, v in PROCESS_ENVIRONMENT.items() if k not in os.environ})  # before numpy and torch

from .errors import TibiaReconError  # noqa: E402

# Each subcommand and the module that adds it through a `register_cli(subparsers)` function, in help order. A
# command line naming one command imports only its module (the others pull in phantoms, metrics, plotting...).
_COMMANDS = {"info": "info", "phantoms": "phantoms.cli", "montage": "phantoms.cli", "prepare": "prepare",
             "train": "training.cli", "export-bundle": "training.cli", "evaluate": "evaluate", "predict": "predict_cli",
             "reduce": "reduction_cli", "segment": "segment", "contralateral": "contralateral", "demo": "demo",
             "bench": "bench"}


def print_outputs(paths: dict, warnings=()) -> None:
    """Print a command's warnings and the files it wrote, one per line."""
    for w in warnings:
        print(f"warning: {w}")
    for name, path in paths.items():
        print(f"  {name}: {path}")


def add_case_arguments(p, ct_help: str, tibia_help: str, tibia_required: bool = True) -> None:
    """The options every command on one fractured case shares: --ct, --tibia-mask, --tibia-label, --fracture-mask."""
    p.add_argument("--ct", required=True, help=ct_help)
    p.add_argument("--tibia-mask", required=tibia_required, default=None, help=tibia_help)
    p.add_argument("--tibia-label", type=int, default=None, help="label value of the tibia in a multi-label map "
                                                                 "(default: every nonzero voxel)")
    p.add_argument("--fracture-mask", required=True, help="coarse fracture-zone mask on the CT grid")


def tqdm_progress(desc: str):
    """A ``progress(fraction, message)`` callback drawing a tqdm bar (only on a terminal); ``.bar`` is the bar, so
    that a failed run can clear it before its one-line error message."""
    from tqdm import tqdm

    bar = tqdm(total=100, desc=desc, bar_format="{l_bar}{bar}| {postfix}", disable=None)

    def update(fraction, message):
        bar.n = int(round(100 * fraction))
        bar.set_postfix_str(message)
        bar.refresh()
        if fraction >= 1.0:
            bar.close()

    update.bar = bar
    return update


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The command-line parser: with ``command``, a known subcommand, only that one is registered."""
    parser = argparse.ArgumentParser(
        prog="tibia-recon",
        description="Predict a patient's healthy tibia from a CT of the fractured tibia, and make data, train, "
                    "evaluate and benchmark the models behind it. Coordinates in files are LPS (ITK/DICOM) "
                    "unless a file name says RAS.",
        epilog="Run `tibia-recon COMMAND --help` for the options of one command.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    modules = [_COMMANDS[command]] if command in _COMMANDS else list(dict.fromkeys(_COMMANDS.values()))
    for name in modules:
        importlib.import_module(f"{__package__}.{name}").register_cli(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(_command(argv))
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except TibiaReconError as exc:
        print(f"tibia-recon {args.command}: error: {_one_line(exc)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"tibia-recon {args.command}: interrupted", file=sys.stderr)
        return 130
    except (OSError, MemoryError) as exc:  # the environment, not a bug: a full disk, a missing permission, memory
        what = "out of memory" if isinstance(exc, MemoryError) else f"{type(exc).__name__}"
        print(f"tibia-recon {args.command}: error: {what}: {_one_line(exc)}", file=sys.stderr)
        return 1
    except Exception as exc:  # noqa: BLE001 - a bug: one line for users, the traceback on request
        if os.environ.get("TIBIA_RECON_TRACEBACK"):
            raise
        print(f"tibia-recon {args.command}: internal error: {type(exc).__name__}: {_one_line(exc)} (this is a bug; "
              "rerun with TIBIA_RECON_TRACEBACK=1 to see where, and report it)", file=sys.stderr)
        return 1


def _one_line(exc: BaseException) -> str:
    """The message of ``exc`` on one line (multi-line messages such as grid mismatches are joined)."""
    return " ".join(line.strip() for line in str(exc).splitlines() if line.strip()) or type(exc).__name__


def _command(argv: list[str]) -> str | None:
    """The subcommand a command line names: its first argument that is not an option (None without one)."""
    return next((a for a in argv if not a.startswith("-")), None)


FAST_EXIT_COMMANDS = ("predict",)  # their outputs are all written, closed and renamed into place by main()


def run() -> None:
    """The console entry point: :func:`main`; after a FAST_EXIT_COMMANDS command, exit without the interpreter's
    teardown (unloading torch, VTK and SimpleITK and freeing their memory takes about 0.6 s after a prediction and
    does nothing for the user). Other commands exit normally, so that nothing they left open is lost. The process
    passes the GIL between its threads every PROCESS_SWITCH_INTERVAL_S."""
    sys.setswitchinterval(PROCESS_SWITCH_INTERVAL_S)
    code = main()
    if _command(sys.argv[1:]) in FAST_EXIT_COMMANDS:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":
    run()
