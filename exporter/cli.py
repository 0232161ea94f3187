"""Command line: flags and wiring only.

    bitrix24-exporter --config config.yaml [--listen-address HOST:PORT] [--once] ...
    bitrix24-exporter --config config.yaml --shard-index I --shard-count N   (docs/sharding.md)
    bitrix24-exporter demo [--listen-address HOST:PORT] [--users N]
    bitrix24-exporter doctor [--config FILE] [--output text|json]

A config error prints one line per problem and exits 2.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import platform
import socket
import ssl
import sys
from collections.abc import AsyncIterator, Sequence
from functools import partial
from typing import Any

from aiohttp import web

from exporter import __version__
from exporter.bitrix import new_session
from exporter.config import (
    Config,
    ConfigError,
    check_receivers_protected,
    load_config,
    parse_config,
    parse_listen_address,
)
from exporter.logs import add_secrets, setup_logging
from exporter.render import ExporterInfo, Publisher
from exporter.server import build_app
from exporter.sharding import Shard, resolve_shard, select_portals
from exporter.supervisor import Supervisor
from exporter.webconfig import WebSecurity

log = logging.getLogger("exporter")

EXIT_CONFIG = 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bitrix24-exporter",
        description="Prometheus exporter for Bitrix24 chat and task counters."
        " Run `bitrix24-exporter demo` to try it against a built-in fake portal.",
    )
    parser.add_argument(
        "--config",
        "--config.file",
        dest="config",
        default="config.yaml",
        help="path of the YAML config (default: %(default)s)",
    )
    parser.add_argument(
        "--listen-address",
        "--web.listen-address",
        dest="listen_address",
        help="host:port to serve on (default: listen_address from the config)",
    )
    _web_config_flag(parser)
    _common_flags(parser)
    parser.add_argument(
        "--check-config",
        "--config.check",
        dest="check_config",
        action="store_true",
        help="validate the config and exit 0 (valid) or 2 (invalid)",
    )
    parser.add_argument(
        "--once",
        action="store_true",
        help="run one poll cycle, print the exposition and exit (1 if a portal failed)",
    )
    parser.add_argument(
        "--shard-index",
        dest="shard_index",
        type=int,
        help="this replica's shard, 0 to count-1 (default: $BITRIX24_SHARD_INDEX, else the"
        " ordinal N of a StatefulSet pod name NAME-N); see docs/sharding.md",
    )
    parser.add_argument(
        "--shard-count",
        dest="shard_count",
        type=int,
        help="number of replicas sharing the portals (default: $BITRIX24_SHARD_COUNT;"
        " unset: no sharding, poll every portal)",
    )
    parser.add_argument(
        "--version",
        action="version",
        version=f"bitrix24-exporter {__version__} (Python {platform.python_version()})",
    )
    return parser


def _common_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--log-level",
        "--log.level",
        dest="log_level",
        default="info",
        choices=["debug", "info", "warning", "error"],
    )
    parser.add_argument(
        "--log-format", "--log.format", dest="log_format", default="text", choices=["text", "json"]
    )


def _web_config_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--web-config-file",
        "--web.config.file",
        dest="web_config_file",
        help="exporter-toolkit web config: TLS, basic auth, headers (docs/web-config.md)",
    )


def _demo_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bitrix24-exporter demo",
        description="Run a fake Bitrix24 portal on 127.0.0.1 and the exporter pointed at it.",
    )
    parser.add_argument("--listen-address", dest="listen_address", default="127.0.0.1:9877")
    parser.add_argument(
        "--portal-address",
        dest="portal_address",
        default="127.0.0.1:0",
        help="where the fake portal listens (port 0: any free port)",
    )
    parser.add_argument("--users", type=int, default=6, help="users on the fake portal")
    parser.add_argument("--poll-interval", dest="poll_interval", default="10s")
    _web_config_flag(parser)
    _common_flags(parser)
    return parser


def _doctor_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bitrix24-exporter doctor",
        description="Check the config against each portal: reachable, credential, owner,"
        " scopes, users and load. Exit 0 if nothing failed (warnings allowed), 1 if a check"
        " failed, 2 for a config error. Reads only; never posts.",
    )
    parser.add_argument("--config", "--config.file", dest="config", default="config.yaml")
    parser.add_argument("--output", choices=["text", "json"], default="text")
    _common_flags(parser)
    parser.set_defaults(log_level="warning")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args_list = list(sys.argv[1:] if argv is None else argv)
    if args_list[:1] == ["demo"]:
        return _demo(_demo_parser().parse_args(args_list[1:]))
    if args_list[:1] == ["doctor"]:
        return _doctor(_doctor_parser().parse_args(args_list[1:]))
    args = _parser().parse_args(args_list)
    setup_logging(args.log_level, args.log_format)
    try:
        shard = resolve_shard(args.shard_index, args.shard_count, os.environ)
    except ValueError as error:
        print(error, file=sys.stderr)
        return EXIT_CONFIG
    # Each input is checked under its own name, and every problem of each is printed.
    problems: list[str] = []
    config: Config | None = None
    try:
        config = load_config(args.config)
    except ConfigError as error:
        problems += error.problems
    listen: tuple[str, int] | None = None
    if args.listen_address is not None:
        try:
            listen = parse_listen_address(args.listen_address)
        except ValueError as error:
            problems.append(f"--listen-address: {error}")
    elif config is not None:
        listen = parse_listen_address(config.listen_address)  # checked with the config
    security: WebSecurity | None = None
    if args.web_config_file:
        try:
            security = WebSecurity(args.web_config_file)
        except ConfigError as error:
            problems += error.problems
    if config is not None and (security is not None or not args.web_config_file):
        problems += check_receivers_protected(config, _has_basic_auth(security))
    if problems or config is None or listen is None:
        for problem in problems:
            print(problem, file=sys.stderr)
        return EXIT_CONFIG
    add_secrets(*config_secrets(config))
    mine = select_portals(config, shard)
    if args.check_config:
        share = "" if shard is None else f"; {shard} polls {len(mine.portals)} of them"
        print(f"{args.config}: OK, {len(config.portals)} portal(s){share}")
        return 0
    info = ExporterInfo(
        poll_interval=config.poll_interval,
        shard=None if shard is None else (shard.index, shard.count),
    )
    if args.once:
        return asyncio.run(_once(mine, info))
    app = build_app(
        mine,
        info=info,
        loader=partial(load_shard_config, args.config, shard, security),
        middlewares=() if security is None else (security.middleware,),
        basic_auth=partial(_has_basic_auth, security),
    )
    _serve(app, listen, ssl_context=None if security is None else security.ssl_context)
    return 0


def _has_basic_auth(security: WebSecurity | None) -> bool:
    """Whether the web config in force asks every request for basic auth."""
    return security is not None and bool(security.config.users)


def load_shard_config(
    path: str, shard: Shard | None, security: WebSecurity | None = None
) -> Config:
    """What a reload loads: the config at `path`, reduced to `shard`'s portals."""
    config = load_config(path)
    # Every portal's secrets, this shard's or not: a log line may still name any of them.
    add_secrets(*config_secrets(config))
    unprotected = check_receivers_protected(config, _has_basic_auth(security))
    if unprotected:
        raise ConfigError(unprotected)
    return select_portals(config, shard)


def config_secrets(config: Config) -> list[str]:
    return list(config.secrets)


def _serve(
    app: web.Application, listen: tuple[str, int], *, ssl_context: ssl.SSLContext | None = None
) -> None:
    host, port = listen
    scheme = "https" if ssl_context else "http"
    log.info("bitrix24-exporter %s listening on %s://%s:%d", __version__, scheme, host or "*", port)
    # run_app turns SIGINT and SIGTERM into a clean shutdown through the cleanup contexts.
    web.run_app(
        app,
        host=host or None,
        port=port,
        ssl_context=ssl_context,
        print=None,
        shutdown_timeout=5.0,
        access_log=None,
    )


async def _once(config: Config, info: ExporterInfo | None = None) -> int:
    """One cycle of every portal, the exposition on stdout; 1 if any portal failed."""
    publisher = Publisher(info or ExporterInfo(poll_interval=config.poll_interval))
    async with new_session() as session:
        await Supervisor(config, session, publisher).run_once()
    sys.stdout.buffer.write(publisher.render_now().text)
    sys.stdout.flush()
    failed = [s.name for s in publisher.snapshots.values() if not s.up]
    if failed:
        log.error("portals failed: %s", ", ".join(failed))
        return 1
    return 0


def _doctor(args: argparse.Namespace) -> int:
    from exporter import doctor

    setup_logging(args.log_level, args.log_format)
    try:
        config = load_config(args.config)
    except ConfigError as error:
        for problem in error.problems:
            print(problem, file=sys.stderr)
        return doctor.EXIT_CONFIG
    add_secrets(*config_secrets(config))

    async def run() -> doctor.Report:
        async with new_session() as session:
            return await doctor.diagnose(config, session)

    report = asyncio.run(run())
    formatted = doctor.format_json if args.output == "json" else doctor.format_text
    sys.stdout.write(formatted(report))
    sys.stdout.flush()
    return report.exit_code


def _free_port(host: str) -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def _demo(args: argparse.Namespace) -> int:
    """The fake portal and the exporter in one process, for a first look without Bitrix24."""
    from exporter import fakeportal

    setup_logging(args.log_level, args.log_format)
    listen = parse_listen_address(args.listen_address)
    portal_host, portal_port = parse_listen_address(args.portal_address)
    portal_host = portal_host or "127.0.0.1"
    portal_port = portal_port or _free_port(portal_host)
    portal, path = fakeportal.demo_portal(users=args.users)
    portal_url = f"http://{portal_host}:{portal_port}"
    raw: dict[str, Any] = {
        "poll_interval": args.poll_interval,
        "portals": [
            {
                "name": "demo",
                "webhook": portal_url + path,
                "tasks": {"users": "all", "groups": [0, 7], "roles": list(fakeportal.ROLES)},
                "im": {"enabled": True, "chats": True},
            }
        ],
    }
    config = parse_config(raw, source="<demo>")
    add_secrets(*config_secrets(config))
    try:
        security = WebSecurity(args.web_config_file) if args.web_config_file else None
    except ConfigError as error:
        print("\n".join(error.problems), file=sys.stderr)
        return EXIT_CONFIG
    app = build_app(config, middlewares=() if security is None else (security.middleware,))
    scheme = "http" if security is None or security.ssl_context is None else "https"

    async def fake_portal(app: web.Application) -> AsyncIterator[None]:
        runner, _ = await fakeportal.serve(portal, portal_host, portal_port)

        async def drift() -> None:
            import random

            rnd = random.Random(7)
            while True:
                await asyncio.sleep(5)
                portal.advance_counters(rnd)

        task = asyncio.create_task(drift())
        host, port = listen
        shown = host or "127.0.0.1"
        print(
            f"Fake Bitrix24 portal: {portal_url}/ ({args.users} users)\n"
            f"Exporter:             {scheme}://{shown}:{port}/\n"
            f"Metrics:              {scheme}://{shown}:{port}/metrics\n"
            "Press Ctrl+C to stop.",
            flush=True,
        )
        yield
        task.cancel()
        await runner.cleanup()

    # The fake portal must be up before the pollers start, and stop after them.
    app.cleanup_ctx.insert(0, fake_portal)
    _serve(app, listen, ssl_context=None if security is None else security.ssl_context)
    return 0
