"""`gateskip serve`: vLLM's OpenAI-compatible server running a gated model with real skipping.

Everything a user can get wrong is checked before vLLM starts (one `error:` line, exit 2):
vLLM missing, the model, gates made for another model, a target with no stored allocation,
the port in use. Then vLLM's own server runs in this process with the plugin's gated model
(enforce_eager, the gates and target in hf_overrides), bound to 127.0.0.1 unless --host says
otherwise. The engine logs its skip fraction and net FLOP saving every --log-interval
seconds and writes them to a file that this process's /metrics reads (gateskip.serving.metrics).
"""

from __future__ import annotations

import argparse
import errno
import socket
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

from . import WORKER, engine_setup, require_vllm
from ..errors import GateSkipError
from ..loading import resolve_spec
from ..validate import integer, ratio, real
from .metrics import register_collector
from .spec import EngineSpec, describe, dumps, resolve

# vLLM options that would undo what the gated engine needs.
REFUSED = {"--no-enforce-eager": "a gated model needs eager execution",
           "--hf-overrides": "gateskip sets hf_overrides itself (--gates, --budget)",
           "--worker-extension-cls": "gateskip sets its own worker extension"}


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "serve", help="serve a gated model with vLLM's OpenAI-compatible server (real skipping in the engine)",
        description="Serve MODEL with vLLM's OpenAI-compatible server; with --gates (or a folder holding "
                    "gateskip.safetensors) the engine skips tokens at the --budget net-saving target. "
                    "Options gateskip does not know go to vLLM (e.g. --max-model-len 2048 "
                    "--tensor-parallel-size 2).")
    p.add_argument("model", help="bundled name, model folder or hub id")
    p.add_argument("--gates", help="gate file or folder (default: the model folder's own gateskip.safetensors)")
    p.add_argument("--budget", type=ratio, default=0.0,
                   help="net FLOP saving target of a stored allocation (default 0: the base model's tokens)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=integer(1, 65535), default=8000)
    p.add_argument("--log-interval", type=real(0.0), default=10.0,
                   help="seconds between the engine's skip reports in the log and on /metrics (default 10)")
    p.set_defaults(func=run, passes_through=True)


def check_port(host: str, port: int) -> None:
    """A one-line error now rather than vLLM's traceback after the model has loaded."""
    try:
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind((host, port))
    except OSError as e:
        if e.errno == errno.EADDRINUSE:
            raise GateSkipError(f"port {port} on {host} is in use; choose another with --port") from None
        raise GateSkipError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None


def vllm_argv(folder: str, spec: EngineSpec | None, args: argparse.Namespace, extra: list[str]) -> list[str]:
    """vLLM's command line for the gated engine; the user's own vLLM options come last."""
    for flag, why in REFUSED.items():
        if any(a == flag or a.startswith(flag + "=") for a in extra):
            raise GateSkipError(f"{flag} cannot be given to gateskip serve: {why}")
    argv = ["--model", folder, "--host", args.host, "--port", str(args.port), "--enforce-eager",
            "--worker-extension-cls", WORKER]
    if spec is not None:
        argv += ["--hf-overrides", dumps(spec)]
    if not any(a.startswith("--served-model-name") for a in extra):
        argv += ["--served-model-name", args.model]
    return argv + extra


def run(args: argparse.Namespace) -> int:
    require_vllm()
    folder = resolve_spec(args.model)
    spec = resolve(folder, args.gates, args.budget)
    check_port(args.host, args.port)
    workdir = tempfile.TemporaryDirectory(prefix="gateskip-serve-")  # removed when the server stops
    if spec is not None:
        spec = replace(spec, metrics_file=str(Path(workdir.name) / "skip.json"), log_interval=args.log_interval)
    argv = vllm_argv(folder, spec, args, list(getattr(args, "extra", [])))
    engine_setup()
    import uvloop
    from vllm.entrypoints.launchers.api_server.entry import run_server
    from vllm.entrypoints.launchers.cli_args import make_arg_parser, validate_parsed_serve_args
    from vllm.entrypoints.serve.utils.api_utils import cli_env_setup
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    cli_env_setup()
    server_args = make_arg_parser(FlexibleArgumentParser(prog="gateskip serve")).parse_args(argv)
    validate_parsed_serve_args(server_args)
    if spec is not None:
        register_collector(spec.metrics_file)
    print(f"gateskip serve: {describe(spec)}; http://{args.host}:{args.port}/v1", file=sys.stderr, flush=True)
    with workdir:
        uvloop.run(run_server(server_args))
    return 0
