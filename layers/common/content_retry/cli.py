"""The ``content-retry`` command line (DESIGN §10)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence


def _db_init(args: argparse.Namespace) -> int:
    from content_retry.database import create_missing, get_engine
    from content_retry.local.environment import local_environment

    with local_environment(need_aws=False), get_engine().begin() as connection:
        created = create_missing(connection)
    if created:
        print(f"created tables: {', '.join(created)}")
    else:
        print("all tables exist; nothing changed")
    return 0


def _openapi(args: argparse.Namespace) -> int:
    from content_retry.api import openapi_document

    document = openapi_document()
    if args.output:
        with open(args.output, "w", encoding="utf-8") as file:
            file.write(document)
        print(f"wrote {args.output}")
    else:
        sys.stdout.write(document)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="content-retry",
        description="Find learning content a roadmap platform failed to generate or save, "
        "and regenerate it.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    db = commands.add_parser("db", help="database administration")
    db_commands = db.add_subparsers(dest="db_command", required=True, metavar="DB_COMMAND")
    init = db_commands.add_parser(
        "init", help="create the tables and indexes that are missing (never drops or alters data)"
    )
    init.set_defaults(run=_db_init)

    openapi = commands.add_parser(
        "openapi", help="print the HTTP API's OpenAPI document (generated from the code)"
    )
    openapi.add_argument("--output", "-o", help="write it to this file (docs/openapi.json)")
    openapi.set_defaults(run=_openapi)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; returns the process exit status."""
    args = build_parser().parse_args(argv)
    try:
        return int(args.run(args))
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
