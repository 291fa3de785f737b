"""``orderflow asyncapi``: print the event catalogue, or record its schemas."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import orjson

from orderflow.cli.common import load_settings
from orderflow.contracts import asyncapi_document, to_yaml
from orderflow.contracts.recorded import write_contracts


def register(commands: Any) -> None:
    """Add ``asyncapi``."""
    parser = commands.add_parser(
        "asyncapi", help="print the AsyncAPI 3.0 document of orderflow's events"
    )
    parser.add_argument("--format", choices=["json", "yaml"], default="json")
    parser.add_argument(
        "--write-contracts",
        metavar="DIR",
        type=Path,
        help="record each event version's schema as DIR/<type>/v<N>.json (new ones only)",
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="with --write-contracts: rewrite recorded versions too (breaks a promise)",
    )
    parser.set_defaults(handler=asyncapi_command)


async def asyncapi_command(args: argparse.Namespace) -> int:
    """Print the document, or write the contracts and list them."""
    if args.write_contracts is not None:
        for path in write_contracts(args.write_contracts, overwrite=args.overwrite):
            print(path)
        return 0
    document = asyncapi_document(load_settings())
    if args.format == "yaml":
        print(to_yaml(document), end="")
    else:
        print(orjson.dumps(document, option=orjson.OPT_INDENT_2).decode())
    return 0
