"""Gateway overhead and streaming, against direct access, HAProxy and the LiteLLM proxy.

Run: ``.venv/bin/python bench/gateway.py`` (about 4 minutes; ``--install`` first installs HAProxy and
wrk from Debian and the LiteLLM proxy into ``bench/.litellm-venv``). Everything runs on 127.0.0.1,
each party in its own process: the fake backend (``fake_backend.py``), the gateway, and the load
generator (wrk for plain requests, ``sse_client.py`` for streams). Every figure is measured in the
same run beside direct access to the same fake backend. A peer that is missing is reported as
missing, never dropped. Writes ``bench/results/gateway.{txt,json,png}``.

The ``traces`` setup measures what OpenTelemetry traces cost the pool: req/s at c=32 with traces
off, on with a sampler of 0, and on with every request exported to an OTLP/HTTP receiver that
answers at once (this script with ``--otlp-receiver PORT``, in its own process), against the fake
backend that answers at once and the one that answers in 20 ms; the variants alternate over
``TRACE_ROUNDS`` rounds, so a slow moment of the machine falls on all of them alike.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

HERE = Path(__file__).parent
RESULTS = HERE / "results"
LITELLM_VENV = HERE / ".litellm-venv"
KEY = "sk-bench"
PACED_MS = 20.0
CLK_TCK = os.sysconf("SC_CLK_TCK")
TRACE_ROUNDS = 5
TRACE_VARIANTS = {
    "traces off": None,
    "on, sampler 0": 0.0,
    "on, every request exported": 1.0,
}
GOALS = {
    "added p50 at c=1": "<= 0.5 ms",
    "throughput at c=32": ">= 0.8x direct",
    "vs LiteLLM at c=32": ">= 10x",
    "streaming relay": ">= 20,000 chunks/s per core",
    "500 slow streams": "< 1 core, no chunk > 50 ms late",
    "traces, sampler 0 (issue 26)": ">= 0.97x of off at c=32",
    "traces, all exported (issue 26)": ">= 0.90x of off at c=32",
}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_ready(url: str, timeout: float = 60, headers: dict[str, str] | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(url, timeout=1, trust_env=False, headers=headers).status_code < 500:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"{url} was not ready within {timeout} s")


@contextmanager
def process(command: list[str], env: dict[str, str] | None = None) -> Iterator[subprocess.Popen[bytes]]:
    proc = subprocess.Popen(
        command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, start_new_session=True
    )
    try:
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def cpu_seconds(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        for task in Path(f"/proc/{pid}/task").iterdir():  # threads included (HAProxy, uvicorn)
            fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])
    return total / CLK_TCK


def children(pid: int) -> list[int]:
    """The process and its descendants (litellm and uvicorn may fork)."""
    found = [pid]
    for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split():
        found += children(int(child))
    return found


def rss_mib(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                total += int(line.split()[1])
    return total / 1024


@dataclass
class Setup:
    name: str
    url: str  # the chat completions URL
    pid: int | None  # the gateway's process (None for direct)


def fake_backend(port: int, slots: int = 1024, rate: float = 0.0, answer_ms: float = 0.0) -> list[str]:
    return [
        sys.executable,
        str(HERE / "fake_backend.py"),
        "--port",
        str(port),
        "--slots",
        str(slots),
        "--tokens-per-second",
        str(rate),
        "--answer-ms",
        str(answer_ms),
    ]


@contextmanager
def gateway(name: str, backends: list[str], slots: int, tmp: Path, extra: str = "") -> Iterator[Setup | str]:
    """Start one setup in front of ``backends``; yields the Setup, or why it cannot run. ``extra``:
    more of the pool's configuration (a ``[telemetry]`` table)."""
    port = free_port()
    if name == "direct":
        yield Setup(name, f"{backends[0]}/v1/chat/completions", None)
        return
    if name == "pool":
        config = tmp / "pool.toml"
        lines = ["[pool]", f'api_keys = ["{KEY}"]', "queue_limit = 100000", "health_interval = 2.0", ""]
        for i, url in enumerate(backends):
            lines += [
                "[[backends]]",
                f'url = "{url}"',
                f'name = "b{i}"',
                f"slots = {slots}",
                'models = ["bench"]',
                "",
            ]
        config.write_text("\n".join(lines) + extra)
        command = [
            sys.executable,
            "-m",
            "local_inference_pool.cli",
            "serve",
            "--config",
            str(config),
            "--port",
            str(port),
            "--log-level",
            "warning",
        ]
        with process(command) as proc:
            wait_ready(f"http://127.0.0.1:{port}/v1/models", headers={"authorization": f"Bearer {KEY}"})
            time.sleep(0.5)  # first probes
            yield Setup(name, f"http://127.0.0.1:{port}/v1/chat/completions", proc.pid)
        return
    if name == "haproxy":
        binary = shutil.which("haproxy")
        if binary is None:
            yield "missing: haproxy (apt-get install haproxy, or run with --install)"
            return
        servers = "\n".join(
            f"  server b{i} {url.removeprefix('http://')} maxconn {slots}" for i, url in enumerate(backends)
        )
        cfg = tmp / "haproxy.cfg"
        cfg.write_text(
            textwrap.dedent(f"""\
            global
              maxconn 8000
            defaults
              mode http
              timeout connect 5s
              timeout client 600s
              timeout server 600s
              timeout queue 600s
            frontend fe
              bind 127.0.0.1:{port}
              default_backend be
            backend be
              balance leastconn
            """)
            + servers
            + "\n"
        )
        with process([binary, "-f", str(cfg), "-db"]) as proc:
            wait_ready(f"http://127.0.0.1:{port}/health")
            yield Setup(name, f"http://127.0.0.1:{port}/v1/chat/completions", proc.pid)
        return
    if name == "litellm":
        litellm = LITELLM_VENV / "bin" / "litellm"
        if not litellm.exists():
            yield f"missing: the LiteLLM proxy ({LITELLM_VENV}; run with --install)"
            return
        deployments = "".join(
            f"  - model_name: bench\n    litellm_params:\n      model: openai/bench\n      api_base: {url}/v1\n      api_key: none\n"
            for url in backends
        )
        cfg = tmp / "litellm.yaml"
        cfg.write_text("model_list:\n" + deployments + "router_settings:\n  routing_strategy: least-busy\n")
        env = {**os.environ, "LITELLM_MASTER_KEY": KEY, "LITELLM_LOG": "ERROR"}
        with process(
            [str(litellm), "--config", str(cfg), "--port", str(port), "--num_workers", "1"], env=env
        ) as proc:
            wait_ready(f"http://127.0.0.1:{port}/health/liveliness", timeout=120)
            yield Setup(name, f"http://127.0.0.1:{port}/v1/chat/completions", proc.pid)
        return
    raise ValueError(name)


WRK_SCRIPT = (
    'wrk.method = "POST"\n'
    """wrk.body = '{"model":"bench","messages":[{"role":"user","content":"hi"}],"max_tokens":8}'\n"""
    'wrk.headers["Content-Type"] = "application/json"\n'
    f'wrk.headers["Authorization"] = "Bearer {KEY}"\n'
)


def _ms(text: str) -> float:
    value, unit = re.fullmatch(r"([\d.]+)(us|ms|s)", text).groups()  # type: ignore[union-attr]
    return float(value) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[unit]


def wrk(url: str, connections: int, seconds: float, tmp: Path) -> dict[str, float]:
    script = tmp / "post.lua"
    script.write_text(WRK_SCRIPT)
    command = ["wrk", "-t1", f"-c{connections}", f"-d{round(seconds)}s", "--latency", "-s", str(script), url]
    subprocess.run([*command[:3], "-d1s", *command[4:]], capture_output=True, check=False)  # warm-up
    out = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    return {
        "rps": rps,
        "p50_ms": _ms(re.search(r"\s50%\s+(\S+)", out).group(1)),  # type: ignore[union-attr]
        "p99_ms": _ms(re.search(r"\s99%\s+(\S+)", out).group(1)),  # type: ignore[union-attr]
        "errors": float(errors.group(1)) if errors else 0.0,
    }


def sse(
    url: str, concurrency: int, streams: int, tokens: int, rate: float = 0.0, duration: float = 0.0
) -> dict[str, Any]:
    command = [
        sys.executable,
        str(HERE / "sse_client.py"),
        url,
        "--concurrency",
        str(concurrency),
        "--streams",
        str(streams),
        "--tokens",
        str(tokens),
        "--rate",
        str(rate),
        "--key",
        KEY,
        "--duration",
        str(duration),
    ]
    out = subprocess.run(command, capture_output=True, text=True, check=True, timeout=900).stdout
    return dict(json.loads(out.strip().splitlines()[-1]))


def measured(setup: Setup, run: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """Run a load and add the gateway's CPU (cores used) and peak RSS while it ran."""
    if setup.pid is None:
        return run()
    pids = children(setup.pid)
    before, started = cpu_seconds(pids), time.monotonic()
    result = run()
    pids = [p for p in children(setup.pid) if Path(f"/proc/{p}").exists()]
    result["gateway_cores"] = round((cpu_seconds(pids) - before) / (time.monotonic() - started), 2)
    result["gateway_rss_mib"] = round(rss_mib(pids))
    return result


def otlp_receiver(port: int) -> None:
    """An OTLP/HTTP receiver that reads each export and answers 200 at once."""
    import uvicorn

    async def app(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        more = True
        while more:
            more = (await receive()).get("more_body", False)
        headers = [(b"content-type", b"application/x-protobuf")]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": b""})

    uvicorn.run(app, host="127.0.0.1", port=port, log_level="error")


def traces(backends: dict[str, str], seconds: float, tmp: Path) -> dict[str, Any]:
    """req/s at c=32 of the pool per tracing variant and backend, alternating over the rounds."""
    port = free_port()
    endpoint = f"http://127.0.0.1:{port}/v1/traces"
    figures: dict[str, dict[str, list[float]]] = {
        backend: {variant: [] for variant in TRACE_VARIANTS} for backend in backends
    }
    with process([sys.executable, __file__, "--otlp-receiver", str(port)]):
        for _ in range(TRACE_ROUNDS):
            for backend, url in backends.items():
                for variant, ratio in TRACE_VARIANTS.items():
                    telemetry = ""
                    if ratio is not None:
                        telemetry = f'[telemetry]\ntraces = true\nsample_ratio = {ratio}\notlp_endpoint = "{endpoint}"\n'
                    with gateway("pool", [url], 1024, tmp, telemetry) as setup:
                        assert not isinstance(setup, str)
                        rps = wrk(setup.url, 32, seconds, tmp)["rps"]
                    figures[backend][variant].append(rps)
                    print(f"   traces, {backend}, {variant}: {rps:,.0f} req/s", flush=True)
    return {
        backend: {variant: statistics.median(values) for variant, values in variants.items()}
        | {"rounds": variants}
        for backend, variants in figures.items()
    }


def install() -> None:
    subprocess.run(["apt-get", "install", "-y", "-qq", "haproxy", "wrk"], check=True)
    subprocess.run([sys.executable, "-m", "venv", str(LITELLM_VENV)], check=True)
    subprocess.run([str(LITELLM_VENV / "bin" / "pip"), "install", "-q", "litellm[proxy]"], check=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0] if __doc__ else None)
    parser.add_argument(
        "--install", action="store_true", help="install HAProxy, wrk and the LiteLLM proxy first"
    )
    parser.add_argument("--seconds", type=float, default=4.0, help="length of each wrk run")
    parser.add_argument("--setups", default="direct,pool,haproxy,litellm,traces")
    parser.add_argument("--otlp-receiver", type=int, metavar="PORT", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.otlp_receiver:
        otlp_receiver(args.otlp_receiver)
        return
    if args.install:
        install()
    if shutil.which("wrk") is None:
        sys.exit("missing: wrk (apt-get install wrk, or run with --install)")
    RESULTS.mkdir(exist_ok=True)
    tmp = RESULTS / "tmp"
    tmp.mkdir(exist_ok=True)
    names = args.setups.split(",")
    results: dict[str, dict[str, Any]] = {}

    fast_port, slow_port, paced_port = free_port(), free_port(), free_port()
    queue_ports = [free_port() for _ in range(4)]
    with (
        process(fake_backend(fast_port)) as fast,
        process(fake_backend(slow_port, rate=20)),
        process(fake_backend(paced_port, answer_ms=PACED_MS)),
    ):
        fast_url, slow_url = f"http://127.0.0.1:{fast_port}", f"http://127.0.0.1:{slow_port}"
        paced_url = f"http://127.0.0.1:{paced_port}"
        for url in (fast_url, slow_url, paced_url):
            wait_ready(f"{url}/health")
        if "traces" in names:
            print("== traces", flush=True)
            backends = {"answers at once": fast_url, f"answers in {PACED_MS:g} ms": paced_url}
            results["traces"] = traces(backends, args.seconds, tmp)
        for name in (name for name in names if name != "traces"):
            print(f"== {name}", flush=True)
            entry: dict[str, Any] = {}
            with gateway(name, [fast_url], 1024, tmp) as setup:
                if isinstance(setup, str):
                    results[name] = {"missing": setup}
                    print(f"   {setup}")
                    continue
                for connections in (1, 32, 128):
                    entry[f"c{connections}"] = wrk(setup.url, connections, args.seconds, tmp)
                    print(f"   c={connections}: {entry[f'c{connections}']}", flush=True)
                backend_before = cpu_seconds([fast.pid])
                started = time.monotonic()
                sse(setup.url, 8, 8, 16)  # warm-up, not measured
                entry["stream"] = measured(setup, lambda: sse(setup.url, 8, 100_000, 256, duration=3.0))
                entry["stream"]["backend_cores"] = round(
                    (cpu_seconds([fast.pid]) - backend_before) / (time.monotonic() - started), 2
                )
                print(f"   streaming: {entry['stream']}", flush=True)
            with gateway(name, [slow_url], 1024, tmp) as setup:
                assert not isinstance(setup, str)
                sse(setup.url, 500, 500, 2, rate=20)  # warm-up, not measured: connections opened
                entry["slow"] = measured(setup, lambda: sse(setup.url, 500, 500, 100, rate=20))
                print(f"   500 slow streams: {entry['slow']}", flush=True)
            with gateway(name, [paced_url], 1024, tmp) as setup:
                assert not isinstance(setup, str)
                entry["paced"] = wrk(setup.url, 32, args.seconds, tmp)
                print(f"   c=32 against a {PACED_MS:g} ms backend: {entry['paced']}", flush=True)
            results[name] = entry

    if any(n in names for n in ("pool", "haproxy")):
        with contextmanager_all([process(fake_backend(p, slots=2, rate=20)) for p in queue_ports]):
            urls = [f"http://127.0.0.1:{p}" for p in queue_ports]
            for url in urls:
                wait_ready(f"{url}/health")
            for name in ("pool", "haproxy"):
                if name not in names or "missing" in results.get(name, {}):
                    continue
                for url in urls:  # peaks are per run: restart counting from the current state
                    httpx.get(f"{url}/stats", trust_env=False)
                with gateway(name, urls, 2, tmp) as setup:
                    assert not isinstance(setup, str)
                    before = [httpx.get(f"{u}/stats", trust_env=False).json()["served"] for u in urls]
                    run = sse(setup.url, 200, 200, 10, rate=20)
                    stats = [httpx.get(f"{u}/stats", trust_env=False).json() for u in urls]
                    run["backend_peaks"] = [s["peak"] for s in stats]
                    run["served"] = sum(s["served"] for s in stats) - sum(before)
                    results[name]["queue"] = run
                    print(f"   {name} queueing 4x2 slots, 200 clients: {run}", flush=True)
    report(results)


@contextmanager
def contextmanager_all(managers: list[Any]) -> Iterator[None]:
    if not managers:
        yield
        return
    with managers[0], contextmanager_all(managers[1:]):
        yield


def report(results: dict[str, dict[str, Any]]) -> None:
    direct = results["direct"]
    traced = results.get("traces", {})
    lines = [
        "gateway benchmark: fake backend, wrk -t1 (plain) and a separate asyncio client (SSE), all on 127.0.0.1",
        "",
    ]
    header = f"{'setup':9} {'p50 c=1':>9} {'added':>8} {'p99 c=1':>9} {'rps c=1':>9} {'rps c=32':>15} {'rps c=128':>15} {'SSE chunks/s':>13} {'cores':>6} {'TTFC p50':>9}"
    lines += [header, "-" * len(header)]
    for name, r in results.items():
        if name == "traces":
            continue
        if "missing" in r:
            lines.append(f"{name:9} {r['missing']}")
            continue
        ratio = {c: r[f"c{c}"]["rps"] / direct[f"c{c}"]["rps"] for c in (32, 128)}
        s = r["stream"]
        lines.append(
            f"{name:9} {r['c1']['p50_ms']:8.2f}ms {r['c1']['p50_ms'] - direct['c1']['p50_ms']:7.2f}ms {r['c1']['p99_ms']:8.2f}ms "
            f"{r['c1']['rps']:9.0f} {r['c32']['rps']:8.0f} ({ratio[32]:.2f}x) {r['c128']['rps']:8.0f} ({ratio[128]:.2f}x) "
            f"{s['chunks_per_s']:13,} {s.get('gateway_cores', 0):6.2f} {s['ttfc_p50_ms']:8.2f}ms"
        )
    lines += ["", f"c=32 against a backend that answers in {PACED_MS:g} ms (a short completion's time)"]
    for name, r in results.items():
        if "paced" in r:
            p = r["paced"]
            ratio = p["rps"] / direct["paced"]["rps"]
            lines.append(f"{name:9} {p['rps']:8.0f} req/s ({ratio:.2f}x direct), p50 {p['p50_ms']:.2f} ms")
    lines += ["", f"{'setup':9} {'500 slow streams (20 tok/s, 100 tokens)':>40}"]
    for name, r in results.items():
        if "slow" in r:
            s = r["slow"]
            lines.append(
                f"{name:9} streams ok {s['streams']}/500, gateway {s.get('gateway_cores', 0):.2f} cores, "
                f"{s.get('gateway_rss_mib', 0)} MiB, chunks >50 ms late: {s['late_chunks']} (worst {s['worst_lateness_ms']} ms)"
            )
    lines += ["", "queueing: 4 backends x 2 slots, 200 concurrent streaming clients (10 tokens at 20/s each)"]
    for name, r in results.items():
        if "queue" in r:
            q = r["queue"]
            lines.append(
                f"{name:9} completed {q['streams']}/200 (failed {q['failed']}), backend peaks {q['backend_peaks']}, "
                f"time to first chunk p50 {q['ttfc_p50_ms']:.0f} ms, p99 {q['ttfc_p99_ms']:.0f} ms"
            )
    if traced:
        lines += ["", f"traces (the pool at c=32, {TRACE_ROUNDS} alternating rounds, medians)"]
        for backend, figures in traced.items():
            base = figures["traces off"]
            shown = ", ".join(
                f"{variant} {figures[variant]:,.0f} ({figures[variant] / base:.2f}x)"
                for variant in TRACE_VARIANTS
            )
            lines.append(f"  backend {backend:18} {shown}")
    lines += ["", "goals (issue 7; traces: issue 26):"]
    pool = results.get("pool", {})
    if "c1" in pool:
        litellm = results.get("litellm", {})
        vs_litellm = pool["c32"]["rps"] / litellm["c32"]["rps"] if "c32" in litellm else None
        stream_per_core = pool["stream"]["chunks_per_s"] / max(pool["stream"].get("gateway_cores", 1), 0.01)
        measured_goals = {
            "added p50 at c=1": f"{pool['c1']['p50_ms'] - direct['c1']['p50_ms']:.2f} ms",
            "throughput at c=32": f"{pool['c32']['rps'] / direct['c32']['rps']:.2f}x direct",
            "vs LiteLLM at c=32": f"{vs_litellm:.1f}x" if vs_litellm else "LiteLLM missing",
            "streaming relay": f"{stream_per_core:,.0f} chunks/s per core",
            "500 slow streams": f"{pool['slow'].get('gateway_cores', 0):.2f} cores, {pool['slow']['late_chunks']} chunks > 50 ms late",
        }
        for backend, figures in traced.items():
            for variant, goal in (
                ("on, sampler 0", "sampler 0"),
                ("on, every request exported", "all exported"),
            ):
                ratio = figures[variant] / figures["traces off"]
                measured_goals.setdefault(f"traces, {goal} (issue 26)", "")
                measured_goals[f"traces, {goal} (issue 26)"] += f"{ratio:.2f}x (backend {backend}) "
        for goal, target in GOALS.items():
            lines.append(f"  {goal:32} goal {target:32} measured {measured_goals.get(goal, 'not run')}")
    text = "\n".join(lines)
    print("\n" + text)
    (RESULTS / "gateway.txt").write_text(text + "\n")
    (RESULTS / "gateway.json").write_text(json.dumps(results, indent=2) + "\n")
    plot(results)


def plot(results: dict[str, dict[str, Any]]) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib missing: no plot (pip install matplotlib)")
        return
    names = [n for n, r in results.items() if "c1" in r]
    fig, (left, middle, right) = plt.subplots(1, 3, figsize=(15, 4))
    width = 0.8 / max(1, len(names))
    for i, name in enumerate(names):
        xs = [x + i * width for x in range(3)]
        left.bar(xs, [results[name][f"c{c}"]["rps"] for c in (1, 32, 128)], width, label=name)
    left.set_xticks([x + width * (len(names) - 1) / 2 for x in range(3)], ["c=1", "c=32", "c=128"])
    left.set_ylabel("requests/s, backend answering at once")
    left.legend()
    paced = [n for n in names if "paced" in results[n]]
    middle.bar(paced, [results[n]["paced"]["rps"] for n in paced])
    middle.set_ylabel(f"requests/s at c=32, backend taking {PACED_MS:g} ms")
    right.bar(names, [results[n]["stream"]["chunks_per_s"] for n in names])
    right.set_ylabel("SSE chunks/s relayed (8 at a time, 256 tokens each)")
    fig.tight_layout()
    fig.savefig(RESULTS / "gateway.png", dpi=110)


if __name__ == "__main__":
    main()
