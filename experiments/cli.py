"""The command-line convention of every entry point (`experiments/`, `analysis/`, `benchmarks/`).

A command is a module with

    def define_flags(flag_values: flags.FlagValues) -> None   # absl DEFINE_*(..., flag_values=flag_values)

    def main(argv: Sequence[str]) -> int:                     # argv[0] is the program, as absl passes it
        try:
            args = cli.parse(argv, define_flags, __doc__)     # [config="configs/qwen.py"] adds --config
            ...
        except cli.UsageError as exc:
            return cli.fail(exc)                              # `error: ...` on stderr, exit code 2

    if __name__ == "__main__":
        cli.run(main)                                         # absl's app.run

Each call of `parse` defines the flags on a fresh `flags.FlagValues`, never on absl's global `flags.FLAGS`:
any set of commands imports into one process without duplicate flags, and `main` runs any number of times
in one process (tests, notebooks) without flags remembered from an earlier call.
"""

from __future__ import annotations

import logging
import os
import re
import sys
from collections.abc import Callable, Sequence
from typing import Any

from absl import app, flags
from ml_collections import config_flags

from ftrl_jax.reporting.stats import DEFAULT_RESAMPLES

DefineFlags = Callable[[flags.FlagValues], None]

HELP_ARGS = ("-h", "-help", "--help", "--helpshort", "--helpfull")
CONFIG_HELP = ("ml_collections config file[:preset]; any field is overridable as --config.FIELD=VALUE, "
               "e.g. --config.rl.num_steps=4")


class UsageError(Exception):
    """A command line that cannot run: the command prints `error: MESSAGE` and exits with code 2."""


def flag_values(define: DefineFlags, argv: Sequence[str], config: str | None = None) -> flags.FlagValues:
    """A new FlagValues holding `define`'s flags, and `--config` (default `config`) when a config applies.

    The config flag reads its `--config.FIELD` overrides from `argv`, so it is defined for one command line.
    """
    values = flags.FlagValues()
    if config is not None:
        config_flags.DEFINE_config_file("config", config, CONFIG_HELP, flag_values=values, lock_config=True,
                                        sys_argv=list(argv))
    define(values)
    return values


def help_text(define: DefineFlags, program: str, doc: str | None, config: str | None = None) -> str:
    """The module's docstring, then absl's listing of every flag with its default."""
    listing = flag_values(define, [program], config).get_help(include_special_flags=False)
    return f"{(doc or '').strip()}\n\nflags:{listing}\n"


def allow_only(fv: flags.FlagValues, name: str, choices: Sequence[str]) -> None:
    """Validates the DEFINE_list flag `name`: at least one item, every item one of `choices`."""
    flags.register_validator(name, lambda values: bool(values) and set(values) <= set(choices),
                             f"--{name} takes a comma-separated list of {','.join(choices)}", flag_values=fv)


def _message(error: flags.Error) -> str:
    """absl's message, shorter where absl's is long: required flags left out, a config file that raised."""
    text = str(error)
    lines = text.splitlines()
    required = r"flag --(\w+)=None: Flag --\1 must have a value other than None\."
    missing = [re.fullmatch(required, line) for line in lines]
    if lines and all(missing):
        names = ", ".join(f"--{match.group(1)}" for match in missing)
        return f"{names} {'is' if len(missing) == 1 else 'are'} required (see --help)"
    if "Traceback (most recent call last)" in text:  # the config file's own error, not its trace
        flag = re.match(r"flag --([\w.]+)=", text)
        last = [line.strip() for line in lines if line.strip()][-1]
        return f"--{flag.group(1) if flag else 'config'}: {last}"
    return text


def _negation_hint(error: flags.UnrecognizedFlagError, values: flags.FlagValues) -> str | None:
    """For `--no_X` or `--no-X` where X is a boolean flag: absl's spelling of the negation."""
    match = re.fullmatch(r"no[-_](\w[\w-]*)", getattr(error, "flagname", "") or "")
    if not match:
        return None
    name = match.group(1)
    for candidate in (name, name.replace("-", "_")):
        if candidate in values and isinstance(values[candidate], flags.BooleanFlag):
            return (f"Unknown command line flag '{error.flagname}': a boolean flag is turned off with "
                    f"--no{candidate} (or --{candidate}=false)")
    return None


def _missing_field_message(exc: BaseException) -> str:
    """One line for a --config.FIELD override that names no field (ml_collections raises a KeyError, or an
    AttributeError wrapping one, whose text may carry a second line with a suggestion)."""
    while isinstance(exc, AttributeError) and exc.args and isinstance(exc.args[0], BaseException):
        exc = exc.args[0]
    text = str(exc.args[0]) if exc.args else "?"
    field, _, hint = text.partition("\n")
    field = field.strip().strip("'\"")
    message = f"--config: the config has no field {field!r}; check the --config.FIELD overrides"
    return f"{message} ({hint.strip()})" if hint.strip() else message


def parse(argv: Sequence[str], define: DefineFlags, doc: str | None, *, config: str | None = None
          ) -> flags.FlagValues:
    """Parses `argv` (argv[0]: the program) into a new FlagValues of `define`'s flags; returns it.

    `--help` (or -h, --helpshort, --helpfull) prints `doc` and every flag with its default, then exits with 0.
    An unknown flag, a bad or missing required value, a stray positional argument or a config file that does
    not load raises UsageError.
    """
    argv = [str(arg) for arg in argv]
    if not argv:
        raise UsageError("empty argv: argv[0] must be the program name")
    flag_args = argv[1:argv.index("--")] if "--" in argv else argv[1:]
    if any(arg in HELP_ARGS for arg in flag_args):
        print(help_text(define, argv[0], doc, config), end="")
        raise SystemExit(0)
    try:
        values = flag_values(define, argv, config)
        rest = values(argv)
    except flags.UnrecognizedFlagError as exc:
        raise UsageError(_negation_hint(exc, values) or _message(exc)) from None
    except flags.Error as exc:
        raise UsageError(_message(exc)) from None
    except (KeyError, AttributeError) as exc:  # ml_collections: a --config.FIELD override naming no field
        if config is None:
            raise
        raise UsageError(_missing_field_message(exc)) from None
    if len(rest) > 1:
        raise UsageError(f"unexpected arguments {rest[1:]}: every argument is a --flag=value (see --help)")
    if config is not None:
        try:
            values.config.keys()  # a file that failed to load is a placeholder that raises on first use
        except OSError as exc:
            # ml_collections' message lists every path it tried; its last line is the actual failure.
            lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
            raise UsageError(f"--config={values['config'].serialize().split('=', 1)[-1]}: "
                             f"{lines[-1] if lines else exc}") from None
    return values


def output_file_problem(path: str, flag: str = "output") -> str | None:
    """Why `--FLAG=path` cannot be written as a file (it is a directory, or its parent is not a writable
    directory), as a usage-error message; None when it can or `path` is empty (no output asked for). Checked
    before any work, so a long run does not end in a traceback."""
    if not path:
        return None
    if os.path.isdir(path):
        return f"--{flag}={path} is a directory; give a file name inside it"
    parent = os.path.dirname(os.path.abspath(path))
    if not (os.path.isdir(parent) and os.access(parent, os.W_OK)):
        return f"--{flag}={path}: {parent} is not a writable directory"
    return None


def define_bootstrap_flags(fv: flags.FlagValues, resamples_help: str = "Resamples of the paired intervals.") -> None:
    """`--bootstrap_resamples`, `--bootstrap_seed` and `--confidence` of the commands that report paired
    bootstrap intervals (`ftrl_jax.reporting.stats.paired_bootstrap`); `bootstrap_settings` reads them."""
    flags.DEFINE_integer("bootstrap_resamples", DEFAULT_RESAMPLES, resamples_help, lower_bound=1, flag_values=fv)
    flags.DEFINE_integer("bootstrap_seed", 0, "Seed of the paired intervals' resampling.", flag_values=fv)
    flags.DEFINE_float("confidence", 0.95, "Confidence level of the paired intervals.", lower_bound=0.5,
                       upper_bound=0.999, flag_values=fv)


def bootstrap_settings(args: flags.FlagValues) -> dict[str, Any]:
    """The keyword arguments of `paired_bootstrap` from `define_bootstrap_flags`' flags."""
    return {"num_resamples": args.bootstrap_resamples, "seed": args.bootstrap_seed, "confidence": args.confidence}


def fail(error: Exception | str) -> int:
    """Prints `error: ...` on stderr; returns the usage-error exit code, 2."""
    print(f"error: {error}", file=sys.stderr)
    return 2


def _absl_flags_at_defaults(argv: Sequence[str]) -> list[str]:
    # The command parses its own flags in main; absl's global ones (logging, pdb) keep their defaults.
    flags.FLAGS(list(argv[:1]))
    return list(argv)


def run(main: Callable[[list[str]], int | None]) -> None:
    """`app.run(main)` for a command whose `main(argv)` parses its own flags with `parse`.

    Our progress messages log at INFO; libraries (jax, orbax) only from WARNING up.
    """

    def logged_main(argv: list[str]) -> int | None:
        logging.getLogger().setLevel(logging.WARNING)
        logging.getLogger("ftrl_jax").setLevel(logging.INFO)
        return main(argv)

    app.run(logged_main, flags_parser=_absl_flags_at_defaults)
