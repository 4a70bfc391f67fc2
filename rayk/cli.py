"""The ``rayk`` command: run the demo, start and stop a deployment, generate, read stats,
profile, and run the benchmarks.

    rayk demo                                   # 2 workers on an embedded Ray, a chat workload
    rayk start --workers 2                      # a detached deployment on the running Ray cluster
    rayk generate --prompt "What is 2+2?"
    rayk stats --watch
    rayk profile --out report.html
    rayk stop

Every command but ``demo`` and ``bench`` works on the Ray cluster at ``--address`` ("auto": the
one running on this machine, or ``RAY_ADDRESS``) and the deployment in ``--namespace``. An error
is one line on stderr and a non-zero exit status, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

EXIT_ERROR = 1
EXIT_USAGE = 2
SOURCE_CHECKOUT = Path(__file__).resolve().parent.parent
"""The repository root when rayk runs from a clone (pip install -e); benchmarks/ lives there."""


class CommandError(Exception):
    """An error the user can act on: printed as one line, exit status 1."""


class _Parser(argparse.ArgumentParser):
    """argparse, with a usage error printed as one line (the usage itself is in --help)."""

    def error(self, message: str):
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def main(argv: list[str] | None = None) -> int:
    parser = _build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return EXIT_USAGE
    try:
        return args.run(args) or 0
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    except Exception as error:
        print(f"rayk {args.command}: error: {_one_line(error)}", file=sys.stderr)
        return EXIT_ERROR


def _one_line(error: Exception) -> str:
    """The line that says what went wrong: a remote error's own last line (after Ray's header
    and the remote traceback), else the first line, with the type when it is not ours."""
    ray = sys.modules.get("ray")
    if ray is not None and isinstance(error, ray.exceptions.RayError):
        from rayk.client import remote_error_message

        return remote_error_message(error)
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    message = lines[0] if lines else ""
    if isinstance(error, (CommandError, ValueError, TypeError, RuntimeError, OSError)):
        return message or type(error).__name__
    return f"{type(error).__name__}: {message}"


# -- the parser ---------------------------------------------------------------------------------


def _build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="rayk", description="rayk: a distributed KV-cache cluster for LLM inference.")
    commands = parser.add_subparsers(dest="command", parser_class=_Parser, metavar="COMMAND")

    demo = commands.add_parser("demo", help="run a shared-prefix chat workload on 2 local workers", description=_doc("demo"))
    demo.add_argument("--model", default=None, help="a Hugging Face directory or a .gguf file (default: SmolLM2-135M-Instruct)")
    demo.add_argument("--workers", type=int, default=2, help="cache workers (default 2)")
    demo.add_argument("--users", type=int, default=4, help="users per help desk, 1 to 6 (default 4; 3 desks)")
    demo.add_argument("--max-tokens", type=int, default=24, help="tokens per answer (default 24)")
    demo.set_defaults(run=_demo)

    start = commands.add_parser("start", help="start a detached deployment on a Ray cluster", description=_doc("start"))
    _add_target(start)
    start.add_argument("--model", default=None, help="a Hugging Face directory or a .gguf file, on every node (default: SmolLM2-135M-Instruct)")
    start.add_argument("--workers", type=int, default=None, help="cache workers (default: one per GPU, or 2 on CPUs)")
    start.add_argument("--routing", default="prefix", help="prefix (default), round_robin, least_loaded or random")
    start.add_argument("--pull", default="auto", help="auto (default), always or never: may a worker pull a prefix from a peer")
    start.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"), help="auto (default): a GPU per worker when the cluster has GPUs")
    start.add_argument("--block-size", type=int, default=16, help="tokens per KV block (default 16)")
    start.add_argument("--num-device-blocks", type=int, default=None, help="device pool blocks per worker (default: sized from memory)")
    start.add_argument("--max-model-len", type=int, default=None, help="tokens per sequence, prompt and output (default: the model's)")
    start.add_argument("--host-bytes", type=int, default=None, help="bytes of host memory per worker for the host tier (default: none)")
    start.add_argument("--disk-dir", default=None, help="directory for the disk tier (each worker uses DIR/worker-N)")
    start.add_argument("--disk-bytes", type=int, default=None, help="bytes of disk per worker (default 8 GiB)")
    start.add_argument("--eviction-policy", default=None, help="lru, lfu, adaptive, cost_aware or cluster_aware (default)")
    start.add_argument(
        "--integrity-key-env",
        default=None,
        metavar="NAME",
        help="seal the disk tiers and peer transfers with the secret in the environment variable NAME, set on every node (default: none)",
    )
    start.add_argument("--max-queued-requests", type=int, default=None, help="requests in flight across the deployment before new ones get Overloaded (default: no bound)")
    start.set_defaults(run=_start)

    stop = commands.add_parser("stop", help="stop the deployment", description=_doc("stop"))
    _add_target(stop)
    stop.set_defaults(run=_stop)

    generate = commands.add_parser("generate", help="generate with a running deployment", description=_doc("generate"))
    _add_target(generate)
    source = generate.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompt", help="one prompt")
    source.add_argument("--file", help='a JSON-lines file: one {"prompt": TEXT} or {"messages": [...]} per line')
    generate.add_argument("--max-tokens", type=int, default=64, help="new tokens per prompt (default 64)")
    generate.add_argument("--temperature", type=float, default=0.0, help="0 (default) is greedy")
    generate.add_argument("--raw", action="store_true", help="send a --prompt or a file's \"prompt\" as it is, without the chat template (\"messages\" always use it)")
    generate.add_argument("--json", action="store_true", help="one JSON object per prompt: text, worker, cached tokens by tier, TTFT")
    generate.set_defaults(run=_generate)

    stats = commands.add_parser("stats", help="per-worker and per-tier cache statistics", description=_doc("stats"))
    _add_target(stats)
    stats.add_argument("--json", action="store_true", help="the whole Cluster.stats() dict as JSON")
    stats.add_argument("--watch", action="store_true", help="refresh the table in place until interrupted")
    stats.add_argument("--interval", type=float, default=2.0, help="seconds between refreshes with --watch (default 2)")
    stats.add_argument("--count", type=int, default=None, help="with --watch, stop after this many refreshes")
    stats.set_defaults(run=_stats)

    profile = commands.add_parser("profile", help="write the cluster's memory report (HTML)", description=_doc("profile"))
    _add_target(profile)
    profile.add_argument("--out", required=True, help="the HTML file to write")
    profile.add_argument("--seconds", type=float, default=5.0, help="how long to record the workers (default 5; 0: memory profiles only)")
    profile.set_defaults(run=_profile)

    bench = commands.add_parser("bench", help="run a benchmark from benchmarks/", description=_doc("bench"))
    bench.add_argument("name", help="routing, transfer, directory, tiers, engine, ...")
    bench.add_argument("bench_args", nargs=argparse.REMAINDER, help="the benchmark's own options (see rayk bench NAME --help)")
    bench.set_defaults(run=_bench)
    return parser


def _add_target(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--address", default="auto", help='the Ray cluster, host:port (default "auto": the one running here, or RAY_ADDRESS)')
    parser.add_argument("--namespace", default="rayk", help="the deployment's Ray namespace (default rayk)")


def _doc(command: str) -> str:
    return {
        "demo": "Starts an embedded Ray on 127.0.0.1 with 2 workers, runs several users behind a few system prompts, "
        "and shows per-worker hits by tier, the router's hits against the oracle, and a few answers.",
        "start": "Starts a coordinator and cache workers, detached and named in --namespace, on the Ray cluster at "
        "--address; returns once every worker has loaded the model.",
        "stop": "Stops every worker (spilling to its disk tier) and the coordinator of the deployment in --namespace.",
        "generate": "Sends prompts to the deployment; with a chat model each prompt becomes a user message in the "
        "model's chat template (--raw sends it as it is). Prints each answer, or JSON with --json.",
        "stats": "Prints a table per worker and tier: blocks, bytes, hit tokens, evictions; then requests and routing.",
        "profile": "Records every worker for --seconds while traffic runs, then writes one HTML report: per worker and "
        "tier tables, occupancy and hit-rate charts, and block heatmaps.",
        "bench": "Runs benchmarks/NAME.py of the source checkout with the options that follow.",
    }[command]


# -- commands -----------------------------------------------------------------------------------


def _demo(args) -> int:
    from rayk.demo import run_demo

    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # the embedded Ray binds to loopback
    _require_no_ray_address()
    run_demo(_model(args.model), num_workers=args.workers, users_per_desk=args.users, max_tokens=args.max_tokens)
    return 0


def _start(args) -> int:
    import rayk

    options = {
        name: value
        for name, value in (
            ("host_bytes", args.host_bytes),
            ("disk_dir", args.disk_dir),
            ("disk_bytes", args.disk_bytes),
            ("eviction_policy", args.eviction_policy),
            ("max_model_len", args.max_model_len),
            ("integrity_key_env", args.integrity_key_env),
        )
        if value is not None
    }
    model = _model(args.model)
    address = _connect_ray(args.address, args.namespace)
    started = time.monotonic()
    cluster = rayk.Cluster(
        model,
        num_workers=args.workers,
        routing=args.routing,
        pull=args.pull,
        namespace=args.namespace,
        device=args.device,
        max_queued_requests=args.max_queued_requests,
        block_size=args.block_size,
        num_device_blocks=args.num_device_blocks,
        **options,
    )
    workers = cluster.stats()["workers"]
    print(f"rayk: deployment {args.namespace!r} ready in {time.monotonic() - started:.1f} s, {len(workers)} workers:")
    for worker_id, stats in sorted(workers.items()):
        print(f"  {worker_id}  node {stats['node_id'][:12]}  {stats['device']}  {stats['device_pool']['num_blocks']} device blocks")
    print(f"attach with: rayk.connect(namespace={args.namespace!r}, address={address!r}); stop with: rayk stop --namespace {args.namespace}")
    return 0


def _stop(args) -> int:
    cluster = _connect(args)
    workers = cluster.workers()
    cluster.shutdown()
    print(f"rayk: stopped deployment {args.namespace!r} ({len(workers)} workers and the coordinator)")
    return 0


def _generate(args) -> int:
    import rayk

    prompts = _read_prompts(args.prompt, args.file)
    params = rayk.SamplingParams(temperature=args.temperature, max_tokens=args.max_tokens)
    cluster = _connect(args)
    outputs = cluster.generate([_as_model_input(cluster, prompt, args.raw) for prompt in prompts], params)
    for output in outputs:
        if args.json:
            record = {
                "text": output.text,
                "worker": output.worker,
                "prompt_tokens": len(output.prompt_token_ids),
                "completion_tokens": len(output.token_ids),
                "cached_tokens": output.num_cached_tokens,
                "cached_tokens_by_tier": output.cached_tokens_by_tier,
                "finish_reason": output.finish_reason,
                "ttft_s": output.ttft_s,
                "latency_s": output.latency_s,
            }
            print(json.dumps(record))
        else:
            print((output.text or "").strip())
            print(f"  [{output.worker}: prompt {len(output.prompt_token_ids)} tokens, {output.num_cached_tokens} from cache{_ttft(output)}]", file=sys.stderr)
    return 0


def _stats(args) -> int:
    from rayk.stats_table import render_stats

    if args.interval <= 0:
        raise CommandError(f"--interval must be > 0 seconds, got {args.interval}")
    if args.count is not None and (args.count < 1 or not args.watch):
        raise CommandError(f"--count must be >= 1 and goes with --watch, got {args.count}{'' if args.watch else ' without --watch'}")
    if args.json and args.watch:
        raise CommandError("--json prints the stats once; it does not go with --watch")
    cluster = _connect(args)
    if args.json:
        print(json.dumps(cluster.stats(), default=str))
        return 0
    if not args.watch:
        print(render_stats(cluster.stats()))
        return 0
    refreshes = 0
    while args.count is None or refreshes < args.count:
        view = render_stats(cluster.stats())
        # Home the cursor and clear the screen, so the table is redrawn in place.
        sys.stdout.write(f"\x1b[H\x1b[2J{time.strftime('%H:%M:%S')}  rayk stats, namespace {args.namespace!r}\n\n{view}\n")
        sys.stdout.flush()
        refreshes += 1
        if args.count is None or refreshes < args.count:
            time.sleep(args.interval)
    return 0


def _profile(args) -> int:
    if args.seconds < 0:
        raise CommandError(f"--seconds must be >= 0, got {args.seconds}")
    cluster = _connect(args)
    cluster.export_profile(args.out, seconds=args.seconds)
    print(f"rayk: wrote the memory report of {len(cluster.workers())} workers to {args.out}")
    return 0


def _bench(args) -> int:
    benchmarks = SOURCE_CHECKOUT / "benchmarks"
    # Only a clone of rayk has them; an installed rayk sits in site-packages beside other packages.
    is_checkout = (SOURCE_CHECKOUT / "pyproject.toml").is_file() and (SOURCE_CHECKOUT / "rayk" / "cli.py").is_file()
    available = sorted(p.stem for p in benchmarks.glob("*.py")) if is_checkout else []
    if not available:
        raise CommandError("the benchmarks ship with the source checkout: run rayk from a clone (pip install -e .)")
    if args.name not in available:
        raise CommandError(f"unknown benchmark {args.name!r}; available: {', '.join(available)}")
    env = dict(os.environ)
    env.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    status = subprocess.run([sys.executable, str(benchmarks / f"{args.name}.py"), *args.bench_args], env=env).returncode
    return 128 - status if status < 0 else status  # killed by signal N: the shell's 128 + N


# -- helpers ------------------------------------------------------------------------------------


def _ttft(output) -> str:
    return f", TTFT {output.ttft_s * 1000:.0f} ms" if output.ttft_s is not None else ""


def _model(model: str | None) -> str:
    from rayk.model.loader import DEFAULT_MODEL

    if model is None:
        return DEFAULT_MODEL
    if model != DEFAULT_MODEL and not os.path.exists(model):
        raise CommandError(f"model {model!r} does not exist (a Hugging Face directory or a .gguf file)")
    return os.path.abspath(model) if os.path.exists(model) else model


def _require_no_ray_address() -> None:
    if os.environ.get("RAY_ADDRESS"):
        raise CommandError("the demo starts its own Ray; unset RAY_ADDRESS (use rayk start to deploy on a cluster)")


def _connect_ray(address: str, namespace: str) -> str:
    """Connects this process to the Ray cluster at ``address``, after checking, within seconds,
    that something listens there (Ray itself would retry for minutes); returns its host:port."""
    import ray
    from ray._private.services import get_ray_address_from_environment

    try:
        resolved = get_ray_address_from_environment(address, None) if address == "auto" else address
    except ConnectionError:
        resolved = None
    if resolved in (None, "auto"):
        raise CommandError("no Ray cluster is running here (--address auto): start one with `ray start --head`, or give --address")
    host, _, port = resolved.rpartition(":")
    if not host or not port.isdigit():
        raise CommandError(f"--address must be host:port, got {resolved!r}")
    try:
        socket.create_connection((host, int(port)), timeout=3).close()
    except OSError as error:
        raise CommandError(f"no Ray cluster at {resolved} ({error.strerror or error})") from None
    ray.init(address=resolved, namespace=namespace, logging_level=logging.ERROR, log_to_driver=False)
    return resolved


def _connect(args):
    import rayk

    _connect_ray(args.address, args.namespace)
    return rayk.connect(namespace=args.namespace)


def _read_prompts(prompt: str | None, path: str | None) -> list:
    """Prompts as strings (user messages or raw text) or conversations (lists of messages)."""
    if prompt is not None:
        if not prompt:
            raise CommandError("--prompt is empty")
        return [prompt]
    try:
        lines = Path(path).read_text().splitlines()
    except OSError as error:
        raise CommandError(f"cannot read --file {path}: {error.strerror or error}") from None
    prompts = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise CommandError(f"{path}:{number}: not JSON ({error.msg})") from None
        if isinstance(record, dict) and isinstance(record.get("prompt"), str) and record["prompt"]:
            prompts.append(record["prompt"])
        elif isinstance(record, dict) and _is_conversation(record.get("messages")):
            prompts.append(record["messages"])
        else:
            raise CommandError(f'{path}:{number}: expected {{"prompt": TEXT}} or {{"messages": [{{"role": ..., "content": ...}}, ...]}}')
    if not prompts:
        raise CommandError(f"{path} holds no prompt")
    return prompts


def _is_conversation(messages) -> bool:
    return isinstance(messages, list) and bool(messages) and all(isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in messages)


def _as_model_input(cluster, prompt, raw: bool) -> str | list[int]:
    """The text as it is (``raw``, or a model without a chat template), else the token ids of
    the chat template over it (a text is one user message)."""
    tokenizer = cluster.tokenizer
    if tokenizer is None:
        raise CommandError("this model has no tokenizer, so text prompts cannot be encoded")
    has_template = tokenizer.chat_template is not None
    if isinstance(prompt, list):
        if not has_template:
            raise CommandError("a prompt gives messages, but this model has no chat template")
        return tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True, max_tokens=cluster.max_model_len)
    if raw or not has_template:
        return prompt
    return tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=True, max_tokens=cluster.max_model_len)
