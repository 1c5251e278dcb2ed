"""`pdserve serve` (the default, multi-process form): start the workers, wait for them, serve the
router here, and tear the workers down whatever way this process ends."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import secrets
import signal
from pathlib import Path
from types import FrameType

from pdserve import aio, envs
from pdserve.cli_args import dataclass_to_argv
from pdserve.config import PER_WORKER_FIELDS, EngineConfig, ServerConfig, WorkerConfig
from pdserve.launch.local import LocalDeployment, free_port
from pdserve.launch.placement import parse_gpus, resolve_transport
from pdserve.process_pauses import PauseMonitor, freeze_startup_heap
from pdserve.router.whole_policy import WholePolicy

logger = logging.getLogger(__name__)

WORKER_START_TIMEOUT_S = 300.0


def _raise_interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def serve_deployment(
    args: argparse.Namespace,
    engine_cfg: EngineConfig,
    server_cfg: ServerConfig,
    worker_defaults: WorkerConfig,
) -> None:
    from pdserve.cli import engine_argv

    port = server_cfg.port or free_port(server_cfg.host)
    if port != server_cfg.port:
        from dataclasses import replace

        server_cfg = replace(server_cfg, port=port)
    num_workers = args.prefill + args.decode + args.colocated
    gpus = deployment_gpus(engine_cfg, args.gpus)
    transport = resolve_transport(args.transport, on_gpu=gpus is not None)
    pin = args.pin_cpus if args.pin_cpus is not None else (os.cpu_count() or 1) >= num_workers > 1
    router_host = "127.0.0.1" if server_cfg.host in ("0.0.0.0", "::") else server_cfg.host
    deployment = LocalDeployment(
        num_prefill=args.prefill,
        num_decode=args.decode,
        num_colocated=args.colocated,
        transport=transport,
        router_url=f"http://{router_host}:{port}",
        engine_args=engine_argv(engine_cfg),
        worker_args=dataclass_to_argv(worker_defaults, exclude=PER_WORKER_FIELDS),
        pin_cpus=pin,
        gpus=gpus,
        gpu_memory_utilization=engine_cfg.cache.gpu_memory_utilization,
        log_dir=Path(args.worker_log_dir) if args.worker_log_dir else None,
    )
    secret = os.environ.get("PDSERVE_SECRET") or secrets.token_hex(32)
    # A SIGTERM while the workers start must still run the teardown below.
    signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        deployment.start(secret)
        deployment.wait_healthy(WORKER_START_TIMEOUT_S)
        aio.run(
            _serve_router(
                deployment,
                engine_cfg,
                server_cfg,
                secret.encode(),
                args.routing,
                whole_policy(worker_defaults),
                worker_defaults.early_prefill,
                worker_defaults.first_token_from_prefill,
            )
        )
    except KeyboardInterrupt:
        logger.info("interrupted: stopping the deployment")
    finally:
        deployment.stop()
        logger.info("deployment stopped")


def whole_policy(worker_defaults: WorkerConfig) -> WholePolicy | None:
    """The router's rule for serving short requests whole on idle prefill workers, if enabled."""
    if not worker_defaults.prefill_serves_whole:
        return None
    return WholePolicy(
        worker_defaults.remote_prefill_threshold,
        worker_defaults.max_whole_per_prefill_worker,
        job_streams=worker_defaults.whole_job_streams,
    )


def deployment_gpus(engine_cfg: EngineConfig, spec: str | None) -> list[int] | None:
    """The GPUs to spread the workers over, or None for CPU workers. `--device cuda:N` without
    `--gpus` means that one GPU."""
    device = engine_cfg.model.resolved_device()
    if device.type != "cuda":
        if spec is not None:
            raise ValueError("--gpus needs the workers on GPUs (--device cuda or auto with a GPU)")
        return None
    import torch

    if spec is None and device.index is not None:
        spec = str(device.index)
    return parse_gpus(spec, torch.cuda.device_count())


async def _serve_router(
    deployment: LocalDeployment,
    engine_cfg: EngineConfig,
    server_cfg: ServerConfig,
    secret: bytes,
    routing: str,
    whole: WholePolicy | None,
    early_prefill: bool,
    first_token_from_prefill: bool,
) -> None:
    import uvicorn

    from pdserve.cli import _ignore_signal, _log_when_ready
    from pdserve.engine.loader import load_tokenizer
    from pdserve.router.disagg_client import DisaggClient
    from pdserve.router.metrics import PauseCollector
    from pdserve.router.server import build_router_app

    token = envs.internal_token(secret)
    tokenizer = await asyncio.to_thread(load_tokenizer, engine_cfg.model)
    client = DisaggClient(
        [w.url for w in deployment.workers], token, tokenizer, routing, whole,
        early_prefill=early_prefill, first_token_from_prefill=first_token_from_prefill,
    )  # fmt: skip
    await client.start()
    if engine_cfg.model.served_model_name:
        client.model_name = engine_cfg.model.served_model_name
    pauses = PauseMonitor("router")
    pauses.watch()
    try:
        app = build_router_app(client, server_cfg, token)
        app.state.ctx.metrics.registry.register(PauseCollector(pauses))
        freeze_startup_heap()
        config = uvicorn.Config(
            app, host=server_cfg.host, port=server_cfg.port, log_level=server_cfg.log_level,
            lifespan="off", timeout_graceful_shutdown=5, access_log=False,
        )  # fmt: skip
        server = uvicorn.Server(config)
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, _ignore_signal)
        serving = asyncio.create_task(server.serve())
        await _log_when_ready(server, serving, client.model_name)
        await serving
    finally:
        pauses.close()
        await client.shutdown()
