"""`pdserve` command line; flags are generated from the config dataclasses (see cli_args.py).

pdserve serve    a whole deployment: router + prefill/decode/colocated worker processes
                 (default 1 prefill + 1 decode); --inprocess: one engine inside the server
pdserve worker   one worker process (the launcher starts these; operators may too)
pdserve bench    load an OpenAI-compatible server and report TTFT/TPOT/ITL/goodput (bench/cli.py)
pdserve profile  measure the engine's cost model on this machine (planner/cli.py)
pdserve plan     should I disaggregate, and with what xPyD? (planner/cli.py)
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import logging
import signal
import sys
from types import FrameType
from typing import TYPE_CHECKING

from pdserve import aio
from pdserve.cli_args import add_dataclass_args, dataclass_from_args, dataclass_to_argv
from pdserve.config import (
    PER_WORKER_FIELDS,
    CacheConfig,
    EngineConfig,
    ModelConfig,
    SchedulerConfig,
    ServerConfig,
    WorkerConfig,
)

if TYPE_CHECKING:
    import uvicorn

logger = logging.getLogger("pdserve.cli")

_LOG_LEVELS = ("critical", "error", "warning", "info", "debug", "trace")


def _add_engine_args(parser: argparse.ArgumentParser) -> None:
    for cls in (ModelConfig, CacheConfig, SchedulerConfig):
        add_dataclass_args(parser.add_argument_group(cls.__name__), cls)
    add_dataclass_args(
        parser.add_argument_group(EngineConfig.__name__),
        EngineConfig,
        help_overrides={
            "attention_backend": "attention implementation: torch (reference, CPU) | triton (GPU)"
        },
    )


def _add_serve_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    serve = subparsers.add_parser(
        "serve",
        help="serve a model over the OpenAI API (router + prefill/decode workers)",
        description="Serve a model over the OpenAI-compatible HTTP API: a router in this process and "
        "prefill / decode / colocated workers as processes of their own.",
    )
    _add_engine_args(serve)
    add_dataclass_args(serve.add_argument_group(ServerConfig.__name__), ServerConfig)
    dep = serve.add_argument_group("deployment")
    dep.add_argument(
        "--prefill", type=int, default=1, metavar="N", help="prefill workers (default: %(default)s)"
    )
    dep.add_argument(
        "--decode", type=int, default=1, metavar="N", help="decode workers (default: %(default)s)"
    )
    dep.add_argument(
        "--colocated", type=int, default=0, metavar="N", help="colocated workers (default: %(default)s)"
    )
    dep.add_argument(
        "--transport", choices=("auto", "shm", "cuda_ipc", "nccl", "nixl", "tcp"), default="auto",
        help="KV transport between workers (default: %(default)s: cuda_ipc on GPUs, shm on CPUs; "
        "nccl is for GPUs on different hosts; nixl needs the nixl package)",
    )  # fmt: skip
    dep.add_argument(
        "--gpus", default=None, metavar="LIST",
        help="GPUs to spread the workers over, e.g. '0,1' (default: all visible, when on GPU); "
        "workers sharing a GPU split --gpu-memory-utilization",
    )  # fmt: skip
    dep.add_argument(
        "--routing", choices=("kv_aware", "round_robin"), default="kv_aware", help="decode-worker choice"
    )
    dep.add_argument(
        "--pin-cpus", action=argparse.BooleanOptionalAction, default=None,
        help="pin each worker to its own CPUs (default: on when there are at least as many CPUs as workers)",
    )  # fmt: skip
    dep.add_argument("--worker-log-dir", default=None, help="write each worker's log to a file here")
    dep.add_argument(
        "--inprocess", action="store_true", help="no workers: one engine inside the server process"
    )
    add_dataclass_args(serve.add_argument_group("disaggregation"), WorkerConfig, exclude=PER_WORKER_FIELDS)
    # Errors in config values are reported against `pdserve serve`'s own usage line.
    serve.set_defaults(handler=functools.partial(_run_serve, serve))


def _add_worker_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    worker = subparsers.add_parser(
        "worker",
        help="run one prefill, decode or colocated worker",
        description="One engine in one process behind the internal worker API. Needs PDSERVE_SECRET.",
    )
    _add_engine_args(worker)
    add_dataclass_args(worker.add_argument_group(WorkerConfig.__name__), WorkerConfig)
    worker.set_defaults(handler=functools.partial(_run_worker, worker))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pdserve", description="LLM serving with prefill/decode disaggregation"
    )
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_serve_parser(subparsers)
    _add_worker_parser(subparsers)
    from pdserve.bench.cli import add_bench_parser
    from pdserve.planner.cli import add_plan_parser, add_profile_parser

    add_bench_parser(subparsers)
    add_profile_parser(subparsers)
    add_plan_parser(subparsers)
    return parser


def engine_config(args: argparse.Namespace) -> EngineConfig:
    return dataclass_from_args(
        EngineConfig,
        args,
        model=dataclass_from_args(ModelConfig, args),
        cache=dataclass_from_args(CacheConfig, args),
        scheduler=dataclass_from_args(SchedulerConfig, args),
    )


def serve_configs(args: argparse.Namespace) -> tuple[EngineConfig, ServerConfig]:
    """The configs of `pdserve serve`; raises ValueError on an invalid combination."""
    server = dataclass_from_args(ServerConfig, args)
    if server.log_level not in _LOG_LEVELS:
        raise ValueError(f"log_level must be one of {'|'.join(_LOG_LEVELS)}, got {server.log_level!r}")
    return engine_config(args), server


def _setup_logging(level: str) -> None:
    logging.basicConfig(
        level=level.upper() if level != "trace" else "DEBUG",
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    # One line per internal poll would drown the request logs.
    logging.getLogger("httpx").setLevel(logging.WARNING)


def _run_serve(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    try:
        engine_cfg, server_cfg = serve_configs(args)
        worker_defaults = dataclass_from_args(WorkerConfig, args, role="decode")
    except ValueError as exc:
        parser.error(str(exc))  # exits with status 2, like any other bad flag
    _setup_logging(server_cfg.log_level)
    if args.inprocess:
        aio.run(_serve(engine_cfg, server_cfg))
        return 0
    from pdserve.launch.serve import serve_deployment

    try:
        serve_deployment(args, engine_cfg, server_cfg, worker_defaults)
    except ValueError as exc:
        parser.error(str(exc))
    return 0


def _run_worker(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    try:
        engine_cfg = engine_config(args)
        worker_cfg = dataclass_from_args(WorkerConfig, args)
    except ValueError as exc:
        parser.error(str(exc))
    from pdserve import envs
    from pdserve.workers.worker import run_worker

    _setup_logging(envs.log_level())
    run_worker(worker_cfg, engine_cfg)
    return 0


def engine_argv(engine_cfg: EngineConfig) -> list[str]:
    """Flags that rebuild engine_cfg in a worker process."""
    return (
        dataclass_to_argv(engine_cfg.model)
        + dataclass_to_argv(engine_cfg.cache)
        + dataclass_to_argv(engine_cfg.scheduler)
        + dataclass_to_argv(engine_cfg)
    )


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
    from pdserve.process_pauses import PauseMonitor, freeze_startup_heap
    from pdserve.router.app import build_app
    from pdserve.router.metrics import PauseCollector

    engine = AsyncLLM(engine_cfg)
    pauses = PauseMonitor("server")
    pauses.watch()
    try:
        engine.start()
        app = build_app(engine, server_cfg)
        app.state.ctx.metrics.registry.register(PauseCollector(pauses))
        freeze_startup_heap()
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
        pauses.close()
        logger.info("shutting down the engine")
        await engine.shutdown()


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    code: int = args.handler(args)
    return code


if __name__ == "__main__":
    sys.exit(main())
