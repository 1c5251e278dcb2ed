"""`pdserve` command line. `pdserve serve` runs the OpenAI-compatible server in front of an
in-process engine; its flags are generated from the config dataclasses (see cli_args.py)."""

from __future__ import annotations

import argparse
import asyncio
import functools
import logging
import signal
import sys
from types import FrameType
from typing import TYPE_CHECKING

from pdserve.cli_args import add_dataclass_args, dataclass_from_args
from pdserve.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig, ServerConfig

if TYPE_CHECKING:
    import uvicorn

logger = logging.getLogger("pdserve.cli")

_LOG_LEVELS = ("critical", "error", "warning", "info", "debug", "trace")


def _add_serve_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    serve = subparsers.add_parser(
        "serve",
        help="serve a model over the OpenAI API with an in-process engine",
        description="Serve a model over the OpenAI-compatible HTTP API with an in-process engine.",
    )
    for cls in (ModelConfig, CacheConfig, SchedulerConfig, ServerConfig):
        add_dataclass_args(serve.add_argument_group(cls.__name__), cls)
    add_dataclass_args(
        serve.add_argument_group(EngineConfig.__name__),
        EngineConfig,
        help_overrides={
            "attention_backend": "attention implementation: torch (reference, CPU) | triton (GPU)"
        },
    )
    # Errors in config values are reported against `pdserve serve`'s own usage line.
    serve.set_defaults(handler=functools.partial(_run_serve, serve))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pdserve", description="LLM serving with prefill/decode disaggregation"
    )
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_serve_parser(subparsers)
    return parser


def serve_configs(args: argparse.Namespace) -> tuple[EngineConfig, ServerConfig]:
    """The configs of `pdserve serve`; raises ValueError on an invalid combination."""
    server = dataclass_from_args(ServerConfig, args)
    if server.log_level not in _LOG_LEVELS:
        raise ValueError(f"log_level must be one of {'|'.join(_LOG_LEVELS)}, got {server.log_level!r}")
    engine = dataclass_from_args(
        EngineConfig,
        args,
        model=dataclass_from_args(ModelConfig, args),
        cache=dataclass_from_args(CacheConfig, args),
        scheduler=dataclass_from_args(SchedulerConfig, args),
    )
    return engine, server


def _run_serve(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    try:
        engine_cfg, server_cfg = serve_configs(args)
    except ValueError as exc:
        parser.error(str(exc))  # exits with status 2, like any other bad flag
    logging.basicConfig(
        level=server_cfg.log_level.upper() if server_cfg.log_level != "trace" else "DEBUG",
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    asyncio.run(_serve(engine_cfg, server_cfg))
    return 0


def _ignore_signal(signum: int, frame: FrameType | None) -> None:
    logger.info("signal %d: already shutting down", signum)


async def _log_when_ready(server: uvicorn.Server, serving: asyncio.Task[None], model_name: str) -> None:
    while not server.started:
        if serving.done():
            return  # startup failed; awaiting the task reports why
        await asyncio.sleep(0.05)
    host, port = server.servers[0].sockets[0].getsockname()[:2]
    logger.info("pdserve ready: serving %r at http://%s:%d/v1", model_name, host, port)


async def _serve(engine_cfg: EngineConfig, server_cfg: ServerConfig) -> None:
    import uvicorn

    from pdserve.engine.async_llm import AsyncLLM
    from pdserve.router.app import build_app

    engine = AsyncLLM(engine_cfg)
    try:
        engine.start()
        app = build_app(engine, server_cfg)
        config = uvicorn.Config(
            app,
            host=server_cfg.host,
            port=server_cfg.port,
            log_level=server_cfg.log_level,
            lifespan="off",
            timeout_graceful_shutdown=5,
        )
        server = uvicorn.Server(config)
        # uvicorn handles SIGINT/SIGTERM while serving, then re-raises the signal once it has
        # stopped; with the default handlers that would kill us before the engine shuts down.
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, _ignore_signal)
        serving = asyncio.create_task(server.serve())
        await _log_when_ready(server, serving, engine.model_name)
        await serving
    finally:
        logger.info("shutting down the engine")
        await engine.shutdown()


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    code: int = args.handler(args)
    return code


if __name__ == "__main__":
    sys.exit(main())
