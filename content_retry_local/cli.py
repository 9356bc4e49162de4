"""The ``content-retry`` command line (DESIGN §10).

Local commands run the deployed handlers unchanged, on local or given services.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import uuid
import warnings
from collections.abc import Sequence
from pathlib import Path
from types import FrameType


def _quiet_handlers(verbose: bool, level: str = "WARNING") -> None:
    """Keep the handlers' JSON logs (below ``level``) and EMF metrics out of a
    person's terminal."""
    if verbose:
        return
    import logging

    os.environ.setdefault("POWERTOOLS_METRICS_DISABLED", "true")
    from content_retry.observability import logger

    logger.setLevel(level)
    # The pool reports a dropped connection it could not close cleanly (the
    # demo drops one on purpose); the handlers' own events say what happened.
    logging.getLogger("sqlalchemy.pool").setLevel(logging.CRITICAL)


def _describe(environment: object) -> None:
    print(f"using {environment}", file=sys.stderr)


def _program() -> str:
    """The command as the person ran it (``.venv/bin/content-retry``), for hints."""
    ran = Path(sys.argv[0]).name if sys.argv else ""
    return sys.argv[0] if ran == "content-retry" else "content-retry"


def _demo(args: argparse.Namespace) -> int:
    from content_retry_local.demo import LookInside, run_demo
    from content_retry_local.environment import LOCAL_STATE_DIR, given_targets, local_environment

    given = given_targets()
    if given:
        # Checked before anything starts or connects: the demo re-seeds its
        # roadmap, drains its queues and cuts its worker's database connection
        # to stage the fault, which it may only do to what it started itself.
        print(
            f"error: content-retry demo refuses to run with {', '.join(given)} set. It stages "
            "a fault (it re-seeds its roadmap, drains its queues and terminates its worker's "
            "database session), so it runs only against the embedded PostgreSQL and the moto "
            "server it starts itself. Unset those variables to run it; against a real database "
            "and AWS, use invoke, drain, redrive and status.",
            file=sys.stderr,
        )
        return 2
    latency = args.llm_latency
    if args.llm_quota is not None:
        # A quota is the local Bedrock's: it implies the bedrock generator.
        latency = QUOTA_DEFAULT_LATENCY if latency is None else latency
        problem = _quota_problem(args.llm_quota[0])
        if problem:
            print(f"error: --llm-quota: {problem}", file=sys.stderr)
            return 2
    # The demo narrates what the handlers do; their own events are for --verbose.
    _quiet_handlers(args.verbose, level="CRITICAL")
    print("content-retry demo: the seed's failure and its repair, on this machine")
    # A database of its own: its sweep plans every roadmap it finds, and the
    # other local commands' database may hold roadmaps someone put there.
    with local_environment(
        aws="thread",
        state_dir=LOCAL_STATE_DIR / "demo",
        llm_latency=latency,
        keep_database=args.keep,
    ) as environment:
        print(
            f"   database: {environment.database} ({environment.data_dir}), "
            f"AWS: {environment.aws}, LLM: {environment.llm}\n"
        )
        look_inside = LookInside(command=_program(), kept=args.keep)
        return run_demo(environment, llm_quota=args.llm_quota, look_inside=look_inside)


# The local Bedrock's seconds a call when --llm-quota is given without --llm-latency.
QUOTA_DEFAULT_LATENCY = 0.5
# A generous bound on the input tokens of one of the demo's Converse calls (the
# prompt and the content's tool schema: about 300).
_DEMO_INPUT_TOKENS = 1000
_QUOTA_FORM = (
    "give TPM or TPM,RPM: the tokens, and optionally the requests, a minute the "
    "model's quota allows, whole numbers above 0 (e.g. 100000 or 100000,60)"
)


def _quota(value: str) -> tuple[int, int | None]:
    """``TPM[,RPM]`` -> (tokens per minute, requests per minute or None)."""
    parts = [part.strip() for part in value.split(",")]
    try:
        numbers = [int(part) for part in parts]
    except ValueError:
        numbers = []
    if len(numbers) not in (1, 2) or any(number <= 0 for number in numbers):
        raise argparse.ArgumentTypeError(f"{value!r} is not a quota: {_QUOTA_FORM}")
    return numbers[0], (numbers[1] if len(numbers) == 2 else None)


def _quota_problem(tokens_per_minute: int) -> str | None:
    """Why no call could ever fit this tokens-per-minute quota, or None."""
    from content_retry.settings import get_settings

    max_tokens = get_settings().bedrock_max_tokens
    least = max_tokens + _DEMO_INPUT_TOKENS
    if tokens_per_minute >= least:
        return None
    return (
        f"{tokens_per_minute} tokens a minute cannot hold a single call of the demo: each "
        f"reserves its input tokens (up to about {_DEMO_INPUT_TOKENS}) plus its maxTokens "
        f"(BEDROCK_MAX_TOKENS={max_tokens}) when it starts. Give at least {least}, better "
        "several times that (e.g. 20000 or 20000,60), as TPM or TPM,RPM."
    )


def _db_upgrade(args: argparse.Namespace) -> int:
    from content_retry.database import get_engine
    from content_retry_local.environment import local_environment
    from content_retry_local.schema import upgrade

    with local_environment(aws="none") as environment:
        _describe(environment)
        report = upgrade(get_engine())
    print(f"{report} (no row of data was changed)")
    return 0


def _invoke(args: argparse.Namespace) -> int:
    from content_retry_local.environment import local_environment
    from content_retry_local.lambda_runtime import invoke

    try:
        event = json.loads(Path(args.event).read_text())
    except (OSError, ValueError) as exc:
        print(f"error: cannot read the event {args.event}: {exc}", file=sys.stderr)
        return 2
    _quiet_handlers(args.verbose)
    with local_environment() as environment:
        _describe(environment)
        result = invoke(args.function, event)
    print(json.dumps(result, indent=2))
    return 0


def _drain(args: argparse.Namespace) -> int:
    from content_retry.aws import client
    from content_retry.settings import get_settings
    from content_retry_local.environment import local_environment
    from content_retry_local.lambda_runtime import DrainReport, drain, queue_depth

    _quiet_handlers(args.verbose)
    with local_environment() as environment:
        _describe(environment)
        settings = get_settings()
        sqs = client("sqs")
        queue_url = settings.require("retry_queue_url")
        total = queue_depth(sqs, queue_url)

        def progress(report: DrainReport, size: int, failed: int) -> None:
            print(
                f"batch {report.batches}: {size} record(s), {size - failed} done, {failed} failed"
                f" ({report.succeeded}/{total} done so far)"
            )

        real_queue = environment.aws == "given"
        report = drain(
            sqs,
            queue_url,
            batch_size=args.batch_size,
            on_batch=progress,
            real_queue=real_queue,
        )
        dlq = queue_depth(sqs, settings.require("retry_dlq_url"))
    print(
        f"drained: {report.received} received in {report.batches} batch(es), "
        f"{report.succeeded} done, {report.failed} failed; dead-letter queue: {dlq}"
    )
    if real_queue and report.failed:
        print(
            "the failed records come back after the queue's visibility timeout, as with Lambda; "
            "drain again then"
        )
    return 0


def _redrive(args: argparse.Namespace) -> int:
    from content_retry.aws import client
    from content_retry.settings import get_settings
    from content_retry_local.environment import local_environment
    from content_retry_local.lambda_runtime import redrive

    # Only queue messages move: no database is needed, or started.
    with local_environment(database=False) as environment:
        _describe(environment)
        settings = get_settings()
        report = redrive(
            client("sqs"),
            settings.require("retry_dlq_url"),
            settings.require("retry_queue_url"),
            dry_run=args.dry_run,
            # moto has no StartMessageMoveTask; real SQS does
            use_move_task=environment.aws == "given",
        )
    if report.dry_run:
        print(f"dry run: {report.moved} message(s) would move back to the retry queue")
    else:
        print(f"moved {report.moved} message(s) back to the retry queue ({report.method})")
    return 0


def _serve(args: argparse.Namespace) -> int:
    from content_retry_local.environment import local_environment
    from content_retry_local.http_api import DEV_USER_HEADER, make_server

    _quiet_handlers(args.verbose)
    with local_environment() as environment:
        _describe(environment)
        try:
            server = make_server(args.port, dev_identity=args.dev_identity)
        except OSError as exc:
            print(
                f"error: cannot listen on 127.0.0.1:{args.port} ({exc.strerror}): "
                "give another port with --port",
                file=sys.stderr,
            )
            return 1
        host, port = server.server_address[:2]
        print(
            f"serving the retry API on http://{host!s}:{port}  (Swagger UI: /docs, /openapi.json)"
        )
        if args.dev_identity:
            print(
                f"DEVELOPMENT IDENTITY: the caller is taken from the {DEV_USER_HEADER} header. "
                "Anyone who can reach this port can act as any user.",
                flush=True,
            )
        else:
            print(
                "no identity: without an authorizer every API request is answered 401 "
                "(start with --dev-identity to take it from a header)",
                flush=True,
            )
        try:
            server.serve_forever()
        except KeyboardInterrupt:
            pass
        finally:
            server.server_close()
    return 0


def _status(args: argparse.Namespace) -> int:
    from content_retry.database import get_engine
    from content_retry.tasks import read_task
    from content_retry_local.environment import local_environment

    try:
        uuid.UUID(args.task_id)
    except ValueError:
        print(
            f"error: {args.task_id!r} is not a task id (a UUID, as a 202 answers)", file=sys.stderr
        )
        return 2
    with local_environment(aws="none"), get_engine().connect() as connection:
        found = read_task(connection, args.task_id)
    if found is None:
        print(f"error: no task {args.task_id}", file=sys.stderr)
        return 1
    # The same view GET /retry-tasks/{task_id} answers with.
    print(found[0].model_dump_json(indent=2))
    return 0


def _plan(args: argparse.Namespace) -> int:
    from content_retry.content_types import UnknownContentTypeError
    from content_retry.database import get_engine
    from content_retry.plan import RoadmapNotFoundError
    from content_retry.plan_view import preview_retry
    from content_retry.retries import DetectDependencies
    from content_retry.settings import get_settings
    from content_retry_local.environment import local_environment

    types = None if args.content_types is None else args.content_types.split(",")
    with local_environment(aws="none"):
        # The operator's view, as a direct invoke is: any roadmap, no owner check.
        deps = DetectDependencies(engine=get_engine(), sqs=None, settings=get_settings())
        try:
            view = preview_retry(deps, args.roadmap_id, content_types=types)
        except UnknownContentTypeError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        except RoadmapNotFoundError:
            print(f"error: no roadmap {args.roadmap_id!r} in this database", file=sys.stderr)
            return 1
    # The same view GET /roadmaps/{roadmap_id}/retry-plan answers with.
    print(view.model_dump_json(indent=2))
    return 0


def _seed(args: argparse.Namespace) -> int:
    from content_retry.database import get_engine
    from content_retry_local.environment import (
        DATABASE_VARIABLES,
        given_targets_of,
        local_environment,
    )
    from content_retry_local.samples import SEED, THEIRS, describe, seed_samples

    given = given_targets_of(DATABASE_VARIABLES)
    if given:
        # Sample roadmaps are for the local database: on a real one they would
        # be rows the platform never wrote (and the seed's id may be a real one).
        print(
            f"error: content-retry seed writes sample roadmaps to the embedded PostgreSQL only; "
            f"unset {', '.join(given)} to seed it",
            file=sys.stderr,
        )
        return 2
    with local_environment(aws="none") as environment, get_engine().begin() as connection:
        seeded = seed_samples(connection)
    program = _program()
    print(f"seeded {len(seeded)} roadmaps in {environment.data_dir} (again: they start over)")
    print("\n".join(describe(seeded)))
    print(
        f"\ntry them: {program} serve --dev-identity, then (the caller is the X-Dev-User header)\n"
        f"  curl -s -X POST http://127.0.0.1:8080/roadmaps/{SEED.roadmap_id}/retry "
        f"-H 'X-Dev-User: {SEED.user_id}' -H 'Content-Type: application/json' "
        f'-d \'{{"content_types": ["tutorial"]}}\'\n'
        f"  curl -s http://127.0.0.1:8080/retry-tasks/TASK_ID -H 'X-Dev-User: {SEED.user_id}'\n"
        f"  {program} drain    (the generate function; then the task view again)\n"
        f"or without a server: {program} invoke detect --event events/api-retry.json\n"
        f"({THEIRS.user_id} owns {THEIRS.roadmap_id}; README: Your first hour)"
    )
    return 0


def _sql(args: argparse.Namespace) -> int:
    from content_retry.settings import get_settings
    from content_retry_local.environment import (
        DATABASE_VARIABLES,
        LOCAL_STATE_DIR,
        given_targets_of,
        local_environment,
    )
    from content_retry_local.sql import open_psql

    given = given_targets_of(DATABASE_VARIABLES)
    if args.demo and given:
        print(
            f"error: --demo is the demo's own embedded PostgreSQL; unset {', '.join(given)} "
            "(or leave out --demo to use that database)",
            file=sys.stderr,
        )
        return 2
    state_dir = LOCAL_STATE_DIR / "demo" if args.demo else LOCAL_STATE_DIR
    with local_environment(aws="none", state_dir=state_dir) as environment:
        _describe(environment)
        if args.statement:
            return _run_statement(args.statement)
        database_url = get_settings().database_url
        if database_url is None:  # DB_AUTH: a token or a secret per connection
            print(
                "error: psql needs DATABASE_URL; give a statement to run instead", file=sys.stderr
            )
            return 2
        return open_psql(database_url)


def _run_statement(statement: str) -> int:
    """Print a statement's rows; PostgreSQL's refusal of it is the answer."""
    from content_retry.database import get_engine
    from content_retry_local.errors import statement_refusal
    from content_retry_local.sql import run_statement

    try:
        print("\n".join(run_statement(get_engine(), statement)))
    except Exception as exc:
        refusal = statement_refusal(exc)
        if refusal is None:  # the database itself: answered as any command's
            raise
        print(f"error: {refusal}", file=sys.stderr)
        return 1
    return 0


def _openapi(args: argparse.Namespace) -> int:
    from content_retry.api import openapi_document

    document = openapi_document()
    if args.output:
        try:
            Path(args.output).write_text(document, encoding="utf-8")
        except OSError as exc:
            print(f"error: cannot write {args.output}: {exc.strerror}", file=sys.stderr)
            return 1
        print(f"wrote {args.output}")
    else:
        sys.stdout.write(document)
    return 0


def _smoke(args: argparse.Namespace) -> int:
    from botocore.exceptions import NoRegionError

    from content_retry_local.smoke import aws_target, run_smoke

    try:
        checks = run_smoke(args.stack, aws_target(args.region))
    except NoRegionError:
        print("error: no AWS Region: set AWS_REGION or give --region", file=sys.stderr)
        return 2
    for check in checks:
        print(check)
    failed = sum(not check.passed for check in checks)
    print(f"smoke {args.stack}: {len(checks) - failed} passed, {failed} failed")
    return 1 if failed else 0


def _stop(args: argparse.Namespace) -> int:
    from content_retry_local.aws import stop_background_moto
    from content_retry_local.environment import LOCAL_STATE_DIR
    from content_retry_local.postgres import stop_embedded_postgres

    stopped = stop_background_moto(LOCAL_STATE_DIR)
    print("stopped the background moto server" if stopped else "no background moto server running")
    # An embedded PostgreSQL left running (demo --keep, or a command killed
    # before it could stop it), unless a running command still uses it.
    for data_dir in (LOCAL_STATE_DIR / "pgdata", LOCAL_STATE_DIR / "demo" / "pgdata"):
        if data_dir.exists():
            print(stop_embedded_postgres(data_dir))
    return 0


def _seconds(value: str) -> float:
    try:
        seconds = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a number of seconds") from None
    if not 0 <= seconds <= 60:
        raise argparse.ArgumentTypeError(f"{value} s: give 0 to 60 seconds")
    return seconds


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="content-retry",
        description="Find learning content a roadmap platform failed to generate or save, "
        "and regenerate it. Local commands start an embedded PostgreSQL and moto's server "
        "when no database (DATABASE_URL, DB_*) and no queues (RETRY_QUEUE_URL, RETRY_DLQ_URL, "
        "AWS_ENDPOINT_URL) are given; given in part, they are refused.",
    )
    parser.add_argument("--debug", action="store_true", help=_DEBUG_HELP)
    # --debug after the command too; SUPPRESS keeps the subcommand from
    # resetting one given before it.
    debug = argparse.ArgumentParser(add_help=False)
    debug.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=_DEBUG_HELP)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, help_: str, run: object) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help_, description=help_, parents=[debug])
        sub.set_defaults(run=run)
        return sub

    demo = command("demo", "the seed's failure and its repair, end to end", _demo)
    demo.add_argument("--verbose", action="store_true", help="show the handlers' logs and metrics")
    demo.add_argument(
        "--keep",
        action="store_true",
        help="leave the demo's database running afterwards and print its psql URL "
        "(content-retry stop stops it)",
    )
    demo.add_argument(
        "--llm-latency",
        type=_seconds,
        default=None,
        metavar="SECONDS",
        help="generate through Bedrock's Converse API (tool use), served by a local Bedrock "
        "that takes this long a call; default: the offline template generator",
    )
    demo.add_argument(
        "--llm-quota",
        type=_quota,
        default=None,
        metavar="TPM[,RPM]",
        help="the local Bedrock enforces this on-demand quota (tokens, and optionally "
        "requests, a minute) as Bedrock does: a call reserves its input plus maxTokens "
        "and is throttled when that does not fit. Implies the Bedrock generator "
        f"(--llm-latency default {QUOTA_DEFAULT_LATENCY:g} s)",
    )

    db = commands.add_parser("db", help="database administration")
    db_commands = db.add_subparsers(dest="db_command", required=True, metavar="DB_COMMAND")
    upgrade_help = (
        "bring the database's schema to this version's: the platform's missing tables, the "
        "pipeline's migrations, its indexes (re-runnable; never changes a row of data)"
    )
    for name in ("upgrade", "init"):
        db_command = db_commands.add_parser(
            name,
            help=upgrade_help if name == "upgrade" else "the same as db upgrade",
            parents=[debug],
        )
        db_command.set_defaults(run=_db_upgrade)

    invoke = command(
        "invoke", "invoke a handler with an event file, like sam local invoke -e", _invoke
    )
    invoke.add_argument("function", choices=["detect", "generate"])
    invoke.add_argument("--event", "-e", required=True, help="event JSON (see events/)")
    invoke.add_argument("--verbose", action="store_true", help="show the handler's logs")

    drain = command(
        "drain", "consume the retry queue through the generate handler until it is empty", _drain
    )
    drain.add_argument("--batch-size", type=int, default=None, help="default: template.yaml's")
    drain.add_argument("--verbose", action="store_true", help="show the handler's logs")

    redrive = command("redrive", "move dead-lettered messages back to the retry queue", _redrive)
    redrive.add_argument("--dry-run", action="store_true", help="count them, change nothing")

    serve = command("serve", "the HTTP API on 127.0.0.1, with its OpenAPI document", _serve)
    serve.add_argument("--port", type=int, default=8080)
    serve.add_argument(
        "--dev-identity",
        action="store_true",
        help="DEVELOPMENT ONLY: take the caller from the X-Dev-User header",
    )
    serve.add_argument("--verbose", action="store_true", help="show the handler's logs")

    status = command("status", "a retry task's status and items", _status)
    status.add_argument("task_id")

    plan = command(
        "plan",
        "what a retry of the roadmap would plan now, and what it would cost (as GET "
        "/roadmaps/{id}/retry-plan); nothing is claimed, sent or written",
        _plan,
    )
    plan.add_argument("roadmap_id")
    plan.add_argument(
        "--content-types", help="comma-separated: tutorial, resources, quiz (default: all)"
    )

    command(
        "seed",
        "put sample roadmaps in the local database to try the API on: the seed's and a few "
        "more (run again, they start over); prints their ids and owners",
        _seed,
    )

    sql = command(
        "sql",
        "run a SQL statement on the local database (or the given one) and print its rows; "
        "with none, open psql on it",
        _sql,
    )
    sql.add_argument("statement", nargs="?", help='e.g. "SELECT * FROM retry_tasks"')
    sql.add_argument("--demo", action="store_true", help="the demo's database (.local/demo)")

    openapi = command("openapi", "print the HTTP API's OpenAPI document (from the code)", _openapi)
    openapi.add_argument("--output", "-o", help="write it to this file (docs/openapi.json)")

    smoke = command(
        "smoke",
        "check a deployed stack without changing anything: the API refuses unsigned callers, "
        "the detect functions answer, the queues and alarms are as template.yaml says "
        "(exit 1, one line per failed check)",
        _smoke,
    )
    smoke.add_argument("--stack", required=True, help="the CloudFormation stack's name")
    smoke.add_argument("--region", help="its Region (default: AWS_REGION, your profile's)")

    command(
        "stop",
        "stop the background moto server the local commands share, and an embedded "
        "PostgreSQL left running (demo --keep) that no command uses",
        _stop,
    )
    return parser


_DEBUG_HELP = "on a failure, show the traceback as well as the one-line answer"


class Stopped(KeyboardInterrupt):
    """SIGTERM or SIGHUP: the command stops as on Ctrl-C, cleaning up after itself."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _stop_on_signal(signum: int, frame: FrameType | None) -> None:
    # Once: a second SIGTERM (a service manager's) must not cut the clean-up short.
    signal.signal(signum, signal.SIG_IGN)
    raise Stopped(signum)


def _quiet_warnings() -> None:
    """Silence the Powertools warning the local runtime raises for nothing.

    The handlers' ``@metrics.log_metrics`` warns when an invocation published
    no metric (a 404, a task view): normal here, where metrics are not even
    published (``POWERTOOLS_METRICS_DISABLED``). Only this process's
    filter changes: the deployed handlers keep the warning.
    """
    warnings.filterwarnings(
        "ignore", message=r"No application metrics to publish", category=UserWarning
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; returns the process exit status."""
    from content_retry_local.errors import explain

    args = build_parser().parse_args(argv)
    _quiet_warnings()
    for signum in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, _stop_on_signal)
    try:
        return int(args.run(args))
    except Stopped as stop:
        return 128 + stop.signum
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # The reader went away (`| head`): nothing more to say, to anyone.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except Exception as exc:
        if args.debug:
            import traceback

            traceback.print_exc()
        answer = explain(exc)
        print(f"error: {answer.message}", file=sys.stderr)
        return answer.status


if __name__ == "__main__":
    sys.exit(main())
