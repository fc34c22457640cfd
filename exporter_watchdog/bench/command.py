"""`exporter-watchdog bench`: measure the served endpoint the way `vllm bench serve` does."""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import re
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
from loguru import logger

from exporter_watchdog import __version__
from exporter_watchdog.bench.dataset import DatasetError, Prompt, load_jsonl, random_prompts
from exporter_watchdog.bench.report import Progress, result_table, sweep_svg, sweep_table, write_json
from exporter_watchdog.bench.runner import LoadSpec, RequestResult, run_load
from exporter_watchdog.bench.stats import summarize

PRESETS = {"quick": 5, "default": 20, "full": 100, "stress": 200}
DEFAULT_URL = "http://127.0.0.1:8000"
DEFAULT_STATUS_URL = "http://127.0.0.1:9400/status"
DEFAULT_SWEEP_LIMIT = 64
ENV_URL = "EXPORTER_WATCHDOG_URL"
ENV_API_KEY = "EXPORTER_WATCHDOG_API_KEY"
# Per sweep level: enough requests for several rounds at that concurrency.
SWEEP_ROUNDS, SWEEP_MIN_PROMPTS = 4, 16
EXIT_OK, EXIT_FAIL, EXIT_USAGE = 0, 1, 2


class BenchError(Exception):
    """A run that cannot go on; carries the exit status."""

    def __init__(self, message: str, code: int = EXIT_FAIL) -> None:
        super().__init__(message)
        self.code = code


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `bench` subcommand; its func returns the exit status."""
    parser = subparsers.add_parser(
        "bench", help="benchmark the served endpoint (vllm bench serve compatible results)",
        description="Send streaming chat completions to the served model and report TTFT, TPOT, ITL and "
                    "end-to-end latency with the field names of `vllm bench serve`.")
    add_bench_arguments(parser)
    parser.set_defaults(func=run_bench)


def add_bench_arguments(p: argparse.ArgumentParser) -> None:
    """All options of the bench command."""
    p.add_argument("preset", nargs="?", default="default", choices=[*PRESETS, "sweep"],
                   help="quick/default/full/stress send 5/20/100/200 prompts; sweep runs concurrency "
                        "1, 2, 4, ... up to --max-concurrency (default: %(default)s)")
    p.add_argument("--config", "-c", metavar="PATH",
                   help="the daemon's config, for the default URL, API key and tunnel hostname")
    target = p.add_mutually_exclusive_group()
    target.add_argument("--url", help=f"server base URL (default: ${ENV_URL}, else the configured local "
                                      f"server, else {DEFAULT_URL})")
    target.add_argument("--tunnel", action="store_true", help="go through the configured tunnel hostname")
    p.add_argument("--model", help="model name (default: the first one /v1/models lists)")
    p.add_argument("--api-key", help=f"API key (default: ${ENV_API_KEY}, else the configured key)")
    p.add_argument("--status-url", default=DEFAULT_STATUS_URL,
                   help="daemon status JSON for profile, GPU count and server arguments; '' to skip "
                        "(default: %(default)s)")
    p.add_argument("--num-prompts", type=int, help="prompts to send (default: from the preset; for sweep, "
                                                   f"max({SWEEP_MIN_PROMPTS}, {SWEEP_ROUNDS} x concurrency))")
    p.add_argument("--max-concurrency", type=int,
                   help=f"requests in flight at most (default: unlimited; sweep: {DEFAULT_SWEEP_LIMIT})")
    p.add_argument("--request-rate", type=float, default=math.inf,
                   help="requests per second, Poisson arrivals (default: inf, all at once)")
    p.add_argument("--burstiness", type=float, default=1.0,
                   help="gamma shape of the arrivals; 1 is Poisson (default: %(default)s)")
    p.add_argument("--input-len", type=int, default=1024, help="random dataset prompt words (default: %(default)s)")
    p.add_argument("--output-len", type=int, default=128, help="max tokens per request (default: %(default)s)")
    p.add_argument("--dataset", type=Path, help="JSONL prompts: one object per line with 'prompt' or 'messages'")
    p.add_argument("--ignore-eos", action="store_true", help="ask the server to ignore EOS (vLLM extension)")
    p.add_argument("--timeout", type=float, default=600.0, help="per-request timeout in s (default: %(default)s)")
    p.add_argument("--result-dir", type=Path, default=Path("bench-results"),
                   help="where result JSON (and the sweep plot) go (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seed for prompts and arrivals (default: %(default)s)")
    p.set_defaults(tunnel_url=None)


def defaults_from_config(args: argparse.Namespace) -> None:
    """Fill args.url, args.api_key and args.tunnel_url from the daemon's config where they are still None."""
    from pathlib import Path

    from exporter_watchdog.config import default_config_path, load_config

    path = Path(args.config) if getattr(args, "config", None) else default_config_path()
    config = load_config(path)  # a ConfigError reaches the CLI: exit 2 naming file, key and value
    if args.url is None:
        host = "127.0.0.1" if config.server.host in ("0.0.0.0", "::") else config.server.host
        args.url = f"http://{host}:{config.server.port}"
    if args.api_key is None and config.server.api_key_file is not None:
        try:
            args.api_key = config.server.api_key_file.read_text().strip() or None
        except OSError as exc:
            raise BenchError(f"server.api_key_file {config.server.api_key_file}: {exc.strerror}", EXIT_USAGE) from None
    if args.tunnel_url is None and config.tunnel_hostname:
        args.tunnel_url = f"https://{config.tunnel_hostname}"


def run_bench(args: argparse.Namespace) -> int:
    """Run the bench command; returns 0, 1 (server unusable, nothing succeeded) or 2 (bad usage)."""
    try:
        return _run(args, sys.stdout, sys.stderr)
    except BenchError as exc:
        print(f"exporter-watchdog bench: error: {exc}", file=sys.stderr)
        return exc.code


def _run(args: argparse.Namespace, out: Any, err: Any) -> int:
    _validate(args)
    base_url, api_key = resolve_target(args)
    model = asyncio.run(preflight(base_url, api_key, args.model))
    daemon = daemon_info(args.status_url)
    spec = LoadSpec(base_url=base_url, model=model, api_key=api_key, request_rate=args.request_rate,
                    burstiness=args.burstiness, timeout=args.timeout, ignore_eos=args.ignore_eos,
                    seed=args.seed)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    meta = _metadata(args, base_url, model, daemon, stamp)
    stem = f"{stamp}-{args.preset}-{_slug(model)}"
    if args.preset != "sweep":
        n = args.num_prompts or PRESETS[args.preset]
        spec = _replace(spec, max_concurrency=args.max_concurrency)
        result = _one_run(spec, _prompts(args, n, args.seed), meta, f"bench {args.preset}", err)
        print(result_table(result), file=out)
        path = _save_json(args.result_dir / f"{stem}.json", result)
        print(f"results: {path}", file=out)
        return EXIT_OK if result["completed"] else _all_failed(result)
    levels = sweep_levels(args.max_concurrency or DEFAULT_SWEEP_LIMIT)
    results = []
    for i, level in enumerate(levels):
        n = args.num_prompts or max(SWEEP_MIN_PROMPTS, SWEEP_ROUNDS * level)
        # A different seed per level, so a prefix cache does not carry one level's prompts into the next.
        prompts = _prompts(args, n, args.seed + 7919 * i)
        result = _one_run(_replace(spec, max_concurrency=level), prompts, meta, f"sweep c={level}", err)
        _save_json(args.result_dir / f"{stem}-c{level}.json", result)
        results.append(result)
        print(f"concurrency {level}: {result['completed']} ok, {result['failed']} failed, "
              f"{result['request_throughput']:.2f} req/s, {result['output_throughput']:.1f} tok/s", file=out)
    print(sweep_table(results), file=out)
    summary = {**meta, "levels": [_scalars(r) for r in results]}
    path = _save_json(args.result_dir / f"{stem}.json", summary)
    plot = path.with_suffix(".svg")
    plot.write_text(sweep_svg(results, f"{model}: throughput vs. latency"), encoding="utf-8")
    print(f"results: {path}\nplot: {plot}", file=out)
    return EXIT_OK if any(r["completed"] for r in results) else _all_failed(results[-1])


def _validate(args: argparse.Namespace) -> None:
    checks: list[tuple[str, Any, Callable[[Any], bool]]] = [
        ("--num-prompts", args.num_prompts, lambda v: v is None or v >= 1),
        ("--max-concurrency", args.max_concurrency, lambda v: v is None or v >= 1),
        ("--request-rate", args.request_rate, lambda v: v > 0),
        ("--burstiness", args.burstiness, lambda v: v > 0 and math.isfinite(v)),
        ("--input-len", args.input_len, lambda v: v >= 1),
        ("--output-len", args.output_len, lambda v: v >= 1),
        ("--timeout", args.timeout, lambda v: v > 0),
    ]
    for name, value, ok in checks:
        if not ok(value):
            raise BenchError(f"{name}: invalid value {value!r}", EXIT_USAGE)
    if args.dataset is not None and not args.dataset.is_file():
        raise BenchError(f"--dataset: no such file {str(args.dataset)!r}", EXIT_USAGE)


def resolve_target(args: argparse.Namespace) -> tuple[str, str | None]:
    """Base URL and API key: options, then the environment, then the daemon's config, then the defaults."""
    if args.url is None and not args.tunnel and os.environ.get(ENV_URL):
        args.url = os.environ[ENV_URL]
    if args.api_key is None and os.environ.get(ENV_API_KEY):
        args.api_key = os.environ[ENV_API_KEY]
    defaults_from_config(args)
    if args.tunnel:
        if not args.tunnel_url:
            raise BenchError("--tunnel: no tunnel hostname is configured", EXIT_USAGE)
        url = str(args.tunnel_url)
    else:
        url = args.url or DEFAULT_URL
    if "://" not in url:
        url = f"http://{url}"
    if not re.match(r"^https?://[^/\s]+", url):
        raise BenchError(f"--url: invalid value {url!r} (expected http://HOST:PORT)", EXIT_USAGE)
    url = url.rstrip("/")
    url = url[: -len("/v1")] if url.endswith("/v1") else url
    return url, args.api_key or None


async def preflight(base_url: str, api_key: str | None, model: str | None) -> str:
    """Check the server answers and takes the key; return the model to use."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        async with httpx.AsyncClient(timeout=10.0) as client:
            r = await client.get(f"{base_url}/v1/models", headers=headers)
    except httpx.HTTPError as exc:
        raise BenchError(f"cannot reach the server at {base_url} ({type(exc).__name__}: {exc}); "
                         "is it running? (`exporter-watchdog status`)") from exc
    if r.status_code in (401, 403):
        which = "the API key was rejected" if api_key else "it needs an API key"
        raise BenchError(f"the server at {base_url} answered HTTP {r.status_code}: {which} "
                         f"(pass --api-key or set {ENV_API_KEY})")
    if r.status_code != 200:
        raise BenchError(f"GET {base_url}/v1/models answered HTTP {r.status_code}: {r.text[:200]}")
    try:
        ids = [str(m["id"]) for m in r.json()["data"]]
    except (ValueError, KeyError, TypeError) as exc:
        raise BenchError(f"GET {base_url}/v1/models: not an OpenAI model list: {r.text[:200]!r}") from exc
    if model is None:
        if not ids:
            raise BenchError(f"the server at {base_url} lists no models; pass --model")
        return ids[0]
    if ids and model not in ids:
        raise BenchError(f"--model: the server at {base_url} does not serve {model!r} (it serves {ids})")
    return model


def daemon_info(status_url: str, timeout: float = 1.0) -> dict[str, Any]:
    """Profile, claimed GPUs and server arguments from the daemon's status JSON; None where unknown."""
    info: dict[str, Any] = {"profile": None, "claimed_gpus": None, "gpu_count": None, "server_args": None}
    if not status_url:
        return info
    try:
        data = httpx.get(status_url, timeout=timeout).json()
    except (httpx.HTTPError, ValueError) as exc:
        logger.debug("no daemon status from {}: {}", status_url, exc)
        return info
    if not isinstance(data, dict):
        return info
    info["profile"] = data.get("profile")
    gpus = data.get("claimed_gpus")
    info["claimed_gpus"] = gpus
    info["gpu_count"] = len(gpus) if isinstance(gpus, list) else gpus if isinstance(gpus, int) else None
    info["server_args"] = data.get("server_argv")
    return info


def sweep_levels(limit: int) -> list[int]:
    """1, 2, 4, ... below limit, then limit itself."""
    levels = [1]
    while levels[-1] * 2 < limit:
        levels.append(levels[-1] * 2)
    if levels[-1] != limit:
        levels.append(limit)
    return levels


def _prompts(args: argparse.Namespace, n: int, seed: int) -> list[Prompt]:
    if args.dataset is None:
        return random_prompts(n, args.input_len, args.output_len, seed)
    try:
        return load_jsonl(args.dataset, n, args.output_len, seed)
    except DatasetError as exc:
        raise BenchError(str(exc), EXIT_USAGE) from exc


def _one_run(spec: LoadSpec, prompts: list[Prompt], meta: dict[str, Any], label: str, err: Any) -> dict[str, Any]:
    progress = Progress(len(prompts), err, label)

    def done(res: RequestResult) -> None:
        progress.update(res)
    outcome = asyncio.run(run_load(spec, prompts, done))
    progress.close()
    rate = spec.request_rate
    return {**meta, "num_prompts": len(prompts), "request_rate": rate if math.isfinite(rate) else "inf",
            "max_concurrency": spec.max_concurrency, **summarize(outcome)}


def _metadata(args: argparse.Namespace, base_url: str, model: str, daemon: dict[str, Any],
              stamp: str) -> dict[str, Any]:
    return {
        "date": stamp, "backend": "openai-chat", "endpoint": "/v1/chat/completions", "base_url": base_url,
        "model_id": model, "model": model, "tokenizer_id": None, "preset": args.preset,
        "burstiness": args.burstiness, "input_len": None if args.dataset else args.input_len,
        "output_len": args.output_len, "dataset": str(args.dataset) if args.dataset else "random",
        "seed": args.seed, "profile": daemon["profile"], "gpu_count": daemon["gpu_count"],
        "claimed_gpus": daemon["claimed_gpus"], "server_args": daemon["server_args"],
        "tool": f"exporter-watchdog bench {__version__}",
    }


def _replace(spec: LoadSpec, **changes: Any) -> LoadSpec:
    return LoadSpec(**{**spec.__dict__, **changes})


def _scalars(result: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in result.items() if not isinstance(v, list)}


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_")[:60] or "model"


def _save_json(path: Path, data: dict[str, Any]) -> Path:
    stem, n = path.stem, 1
    while path.exists():
        n += 1
        path = path.with_name(f"{stem}-{n}{path.suffix}")
    try:
        write_json(path, data)
    except OSError as exc:
        raise BenchError(f"--result-dir: cannot write {path}: {exc}") from exc
    return path


def _all_failed(result: dict[str, Any]) -> int:
    reasons = ", ".join(f"{k}: {v}" for k, v in sorted(result["error_counts"].items()))
    first = next((e for e in result["errors"] if e), "")
    print(f"exporter-watchdog bench: error: every request failed ({reasons}); first error: {first[:300]}",
          file=sys.stderr)
    return EXIT_FAIL


def main(argv: list[str] | None = None) -> int:
    """Entry point of `python -m exporter_watchdog.bench.command [preset] [options]`."""
    parser = argparse.ArgumentParser(prog="exporter-watchdog")
    sub = parser.add_subparsers(dest="command", required=True)
    register(sub)
    args = parser.parse_args(["bench", *(sys.argv[1:] if argv is None else argv)])
    result: int = args.func(args)
    return result


if __name__ == "__main__":
    sys.exit(main())
