"""`python -m slime.utils.arguments --help` prints every flag; with flags, prints the parsed args as JSON."""

from __future__ import annotations

import json

from slime.utils.arguments import parse_args


def main() -> None:
    args = parse_args()
    print(json.dumps(vars(args), indent=2, sort_keys=True, default=str))


if __name__ == "__main__":
    main()
