"""`FlexibleArgumentParser`, as vLLM's: an `argparse.ArgumentParser` whose long options may be
written with underscores or dashes (`--max_model_len` = `--max-model-len`), used with
`EngineArgs.add_cli_args(parser)`."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any


class FlexibleArgumentParser(argparse.ArgumentParser):
    """An ArgumentParser that takes `--some_option` for `--some-option`."""

    def parse_known_args(  # type: ignore[override]
        self, args: Sequence[str] | None = None, namespace: Any = None
    ) -> tuple[argparse.Namespace, list[str]]:
        if args is None:
            args = sys.argv[1:]
        return super().parse_known_args(_dashed(args), namespace)


def _dashed(args: Sequence[str]) -> list[str]:
    """`--a_b=c` -> `--a-b=c`; values and everything after `--` are left alone."""
    result, options_done = [], False
    for arg in args:
        if arg == "--":
            options_done = True
        elif not options_done and arg.startswith("--"):
            name, sep, value = arg.partition("=")
            arg = name.replace("_", "-") + sep + value
        result.append(arg)
    return result
