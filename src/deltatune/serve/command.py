"""`deltatune serve RUN_DIR... [--host 127.0.0.1] [--port 8000]`: the HTTP API under uvicorn.

Every option is a `ServeSettings` field (its help is the field's docstring). The settings are checked
before any model loads (a non-loopback --host without --api-key or --insecure is refused), then the
base model loads once with every delta attached, and uvicorn serves until SIGINT or SIGTERM, on
which it stops accepting connections, lets the requests in flight finish, and exits.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from deltatune.cli_options import add_config_options, config_from_options
from deltatune.errors import DeltatuneError

API_KEY_VARIABLE = "DELTATUNE_API_KEY"


def add_serve_parser(commands) -> None:
    from deltatune.serve.settings import ServeSettings

    serve = commands.add_parser(
        "serve",
        help="serve many task deltas from one base model over HTTP (FastAPI)",
        description="Serve the deltas of RUN_DIR... (trained on one base model) over "
        "HTTP: POST /v1/predict, GET /v1/tasks, GET /health, OpenAPI at /docs. Needs "
        "the serve extra: pip install 'deltatune[serve]'.",
    )
    serve.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run directories of the deltas to serve")
    serve.add_argument("--base", help="load the base model from here instead of the recorded name")
    serve.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"))
    add_config_options(
        serve,
        ServeSettings,
        notes={"api_key": f"(or the environment variable {API_KEY_VARIABLE}, which keeps it out of process listings)"},
    )


def settings_from(args: argparse.Namespace):
    """The `ServeSettings` the flags (and DELTATUNE_API_KEY) ask for, every problem in one error."""
    from deltatune.serve.settings import ServeSettings

    values: dict = {}
    if os.environ.get(API_KEY_VARIABLE):  # a typed --api-key still wins
        values["api_key"] = os.environ[API_KEY_VARIABLE]
    typed = argparse.Namespace(**vars(args))
    if typed.delta_root is not None:
        typed.delta_root = Path(typed.delta_root)
    return config_from_options(ServeSettings, typed, values=values)


def run_serve_command(args: argparse.Namespace) -> int:
    try:
        import fastapi  # noqa: F401
        import uvicorn
    except ImportError as error:
        raise DeltatuneError(
            f"`deltatune serve` needs FastAPI and uvicorn ({error}); install them with pip install 'deltatune[serve]'."
        ) from None
    from deltatune.devices import resolve_device
    from deltatune.serve.app import create_app
    from deltatune.serve.multi import load_many

    settings = settings_from(args)  # refused here, before the model loads, if the bind is unsafe
    device = resolve_device(settings.device)  # a device this machine lacks is refused before loading
    engine = load_many(args.run_dirs, base=args.base, batch_invariant=settings.batch_invariant).to(device)
    app = create_app(engine, settings)
    names = ", ".join(f"{name} ({served.method})" for name, served in engine.tasks.items())
    print(f"deltatune serve: {len(engine.tasks)} task(s) on {engine.base_name}: {names}", flush=True)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level=args.log_level,
        timeout_graceful_shutdown=int(settings.request_timeout_s) + 5,
        access_log=False,
    )
    try:
        uvicorn.Server(config).run()
    except KeyboardInterrupt:  # uvicorn shuts down gracefully on Ctrl-C, then raises the signal again
        print("deltatune serve: stopped (Ctrl-C); the requests in flight were answered.", file=sys.stderr)
        return 130
    return 0


__all__ = ["add_serve_parser", "run_serve_command", "settings_from"]
