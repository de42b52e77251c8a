"""`attnc zoo list|show NAME`: the zoo's catalogue on the command line.

`list` prints every variant with its family and paper; `show NAME` prints the variant's paper, family,
layer class and spec file, then the spec itself. Wired into `codegen/cli.py` through `add_parser`/`run`.
"""

from __future__ import annotations

import argparse
import sys

EXIT_OK, EXIT_USAGE = 0, 2


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:  # type: ignore[type-arg]
    """Add `zoo` (with `list` and `show NAME`) to the attnc command line."""
    p = subparsers.add_parser("zoo", help="the model zoo: list the attention variants or show one's spec")
    sub = p.add_subparsers(dest="zoo_command", metavar="ZOO_COMMAND")
    sub.required = True
    ls = sub.add_parser("list", help="every variant with its family and paper")
    ls.add_argument(
        "--family", choices=["softmax", "routing", "two-stage", "linear"], help="only this family"
    )
    show = sub.add_parser("show", help="print a variant's paper, layer and spec")
    show.add_argument("name", metavar="NAME")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    from attnc import zoo

    if args.zoo_command == "list":
        names = zoo.list(args.family)
        width = max((len(n) for n in names), default=0)
        for name in names:
            v = zoo.variant(name)
            print(f"{name:<{width}}  {v.family.value:<9}  {v.paper}")
        for name, why in sorted(zoo.BLOCKED.items()):
            print(f"{name:<{width}}  blocked    {why}")
        return EXIT_OK
    try:
        v = zoo.variant(args.name)
    except KeyError as err:
        print(f"attnc: error: {err.args[0]}", file=sys.stderr)
        return EXIT_USAGE
    layer = f"{v.layer.__module__}.{v.layer.__qualname__}"
    print(f"{v.name}: {v.paper}")
    print(f"family: {v.family.value}   use: {v.use.value}   layer: {layer}   spec: {v.spec_file}")
    print()
    print(v.spec_file.read_text(encoding="utf-8").rstrip())
    return EXIT_OK
