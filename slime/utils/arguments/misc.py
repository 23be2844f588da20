"""Miscellaneous flags: `python train.py --custom-config-path extra.yaml --ci-test ...`."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("misc")
    group.add_argument("--custom-config-path", type=str, default=None,
                       help="YAML file whose keys (dash or underscore form) set flags. Flags given on the "
                            "command line win over the file; the file wins over defaults. Unknown keys are errors.")
    group.add_argument("--http-proxy", type=str, default=None, help="Proxy for outgoing HTTP (not supported yet).")
    group.add_argument("--ci-test", action="store_true", default=False, help="Run CI self-checks during training.")
