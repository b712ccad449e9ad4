"""The exact prompt-state cache (service/prefix_cache.py): the same loads against the cache on and off.

In one run, for each scenario and each of ``--rounds`` rounds, ``textgen serve`` (the default bundle, one process,
bench/serve_load.py's :class:`Server`) is started with ``--prefix-cache-mb 64`` (on, the default block) and with
``--prefix-cache-mb 0`` (off), in the order on/off, off/on, on/off... (drift hits both alike); every server gets a
fresh cache. The load runs in a load-generator process (asyncio, grpc.aio; this file with ``_load``), so the bench
process stays idle. Before each measured load a warm-up runs through sessions (CreateSession "W", Feed, Generate),
which never touches the cache. Scenarios (``--scenarios``):

* **shared**: a 4,000-character instruction built from this Python's own stdlib docstrings (:func:`stdlib_text`)
  + a different 50-character question per call; 64 clients at once, each making ``--shared-calls`` one-shot
  streaming Generates (max_tokens 20, greedy). TTFT (request sent -> first token message) p50/p99, wall time,
  tok/s, cached_tokens per call. Target: TTFT p50 off / on >= 10x.
* **chat**: stateless chat clients that re-send their whole growing conversation (a ~500-character instruction,
  then ``User: ...\\nAssistant:`` turns with the answers as received) + a new ~60-character message, 10 turns,
  8 conversations at once with their own seeds (max_tokens 60, temperature 0.7). Characters sent, new characters
  (len(prompt_k) - len(prompt_{k-1}); split into the previous answer and the client's own new text) and characters
  fed (sum of usage.prompt_tokens - usage.cached_tokens). Target: fed <= 1.2x the new characters (the
  conversations share their instruction, so fed can be under the new characters).
* **unique**: 0% hits: 64 clients, each making ``--unique-calls`` one-shot Generates of a unique 200-character
  prompt (client and call index first), max_tokens 200, temperature 0.8, seeded. Gen tok/s and the server's CPU
  seconds per 1,000 generated tokens (/proc/PID/stat), per round and the median of the rounds' on/off ratios
  (``--unique-rounds`` pairs, 6 by default: the ratio is small and the machine noisy). Target: tok/s on / off
  >= 0.97.
* **rss** (one pair, not ``--rounds``): one server with the cache on (``--prefix-cache-mb`` = ``--rss-budget-mb``,
  default 16 so that it fills within the time) and one with it off, each fed unique 2,000-character one-shot
  Generates (max_tokens 1, 32 clients) for ``--rss-seconds``: VmRSS growth (/proc/PID/status) on - off against the
  budget (target <= 1.1x budget). Feeding 100,000 such prompts through the model would take ~15-25 minutes per
  server on 2 cores (about 100 prompts/s), so also, in a process of its own without a model, 100,000 prompts'
  snapshots (2,000 tokens, block 256: 8 entries each, states of the default bundle's size) go straight into
  :class:`PrefixCache` with a 64 MiB budget: RSS growth against that budget.

Sanity checks: the cache-on servers must report cached_tokens > 0 in shared and chat, and every deterministic
request's text (greedy or seeded) must be the same in every run, on and off (mismatch counts are printed).

    python bench/prefix_cache.py                          # everything, 2 rounds (under 10 minutes on 2 cores)
    python bench/prefix_cache.py --quick                  # a ~2-minute smoke run
    python bench/prefix_cache.py --scenarios shared,chat --rounds 4 --json /tmp/prefix.json
    python bench/prefix_cache.py --scenarios rss --rss-seconds 300 --rss-budget-mb 32
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import hashlib
import importlib
import inspect
import json
import random
import re
import resource
import statistics
import string
import subprocess
import sys
import time
import urllib.request
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from _common import default_bundle
from serve_load import Server, pct

SCENARIOS = ("shared", "chat", "unique", "rss")
KNOWN = set(string.ascii_letters + string.digits + string.punctuation + " \n")  # characters the model knows
RANDOM_CHARS = string.ascii_letters + string.digits + string.punctuation + " " * 16 + "\n"
DOC_MODULES = ("json", "textwrap", "functools", "itertools", "heapq", "bisect", "statistics", "shutil", "fnmatch",
               "glob", "base64", "difflib", "calendar", "colorsys")
CHAT_MODULES = ("string", "random", "keyword")
SHARED_HEADER = ("You are the reference desk for the Python standard library. Answer each question in one short "
                 "sentence, using only the reference below.\n\nReference:\n")
CHAT_HEADER = ("A conversation between a user and an assistant who knows the Python standard library well. The "
               "assistant answers briefly and precisely.\n\n")
QUESTION_NAMES = ("json.dumps", "json.loads", "textwrap.wrap", "textwrap.dedent", "functools.reduce",
                  "functools.partial", "itertools.chain", "itertools.groupby", "heapq.heappush", "heapq.nlargest",
                  "bisect.insort", "statistics.median", "shutil.copytree", "fnmatch.filter", "glob.glob",
                  "base64.b64encode", "difflib.unified_diff", "calendar.monthrange")
USER_OPENERS = ("How do I", "What is the best way to", "Can you show me how to", "Why does it fail when I try to",
                "Is it safe to", "What happens if I")
USER_TASKS = ("sort a list of tuples by the second item", "read a large file line by line", "merge two dicts",
              "parse a date string into a datetime", "remove duplicates but keep the order", "copy a folder",
              "split a string on several separators", "time a small function", "flatten a nested list",
              "format a float with two decimals", "walk a directory tree", "encode bytes as base64 text")
QUESTION_CHARS = 50
USER_CHARS = 60
METRICS = {"lookups": "textgen_prefix_cache_lookups_total", "hits": "textgen_prefix_cache_hits_total",
           "reused": "textgen_prefix_cache_reused_tokens_total", "evictions": "textgen_prefix_cache_evictions_total",
           "prompt_tokens": "textgen_prompt_tokens_total", "entries": "textgen_prefix_cache_entries",
           "bytes": "textgen_prefix_cache_bytes"}
GAUGES = ("entries", "bytes")
MiB = 2**20


# --------------------------------------------------------------------------------------------- texts


def stdlib_text(modules: tuple[str, ...], n: int) -> str:
    """``n`` characters of the docstrings of the public functions and classes of ``modules`` (this Python's own),
    in a fixed order, each under its qualified name; characters the model does not know are dropped."""
    parts: list[str] = []
    size = 0
    for name in modules:
        mod = importlib.import_module(name)
        for attr in sorted(vars(mod)):
            obj = getattr(mod, attr)
            if attr.startswith("_") or not (inspect.isroutine(obj) or inspect.isclass(obj)):
                continue
            doc = inspect.getdoc(obj)
            if doc and str(getattr(obj, "__module__", "")).split(".")[0] == name:
                parts.append(f"{name}.{attr}: {doc}\n\n")
                size += len(parts[-1])
        if size > 2 * n:
            break
    text = "".join(c for c in "".join(parts).replace("\t", "    ") if c in KNOWN)
    if len(text) < n:
        raise RuntimeError(f"the docstrings of {modules} give {len(text)} characters, not {n}")
    return text[:n]


def shared_instruction(n: int = 4000) -> str:
    return SHARED_HEADER + stdlib_text(DOC_MODULES, n - len(SHARED_HEADER))


def question(client: int, call: int) -> str:
    """A 50-character question, different for every (client, call) from its first characters on."""
    name = QUESTION_NAMES[(client * 5 + call) % len(QUESTION_NAMES)]
    body = cut(f"\n\nQ{client:03d}.{call}: What is {name} used for", QUESTION_CHARS - 4)
    return body.ljust(QUESTION_CHARS - 4, ".") + "?\nA:"


def cut(text: str, n: int) -> str:
    """``text`` cut to at most ``n`` characters, at a word's end."""
    return text if len(text) <= n else text[:n + 1].rsplit(" ", 1)[0]


def chat_instruction(n: int = 500) -> str:
    return CHAT_HEADER + stdlib_text(CHAT_MODULES, n - len(CHAT_HEADER) - 2) + "\n\n"


def user_message(rng: random.Random, turn: int) -> str:
    text = f"{rng.choice(USER_OPENERS)} {rng.choice(USER_TASKS)}? Please keep it short, this is turn {turn}."
    return cut(text, USER_CHARS)


def unique_prompt(client: int, call: int, n: int, seed: int) -> str:
    """``n`` random known characters after the client and call index: no two prompts share a first block."""
    head = f"{seed}:{client:03d}:{call:06d}: "
    rng = random.Random(f"{seed}/{client}/{call}")
    return head + "".join(rng.choices(RANDOM_CHARS, k=n - len(head)))


# --------------------------------------------------------------------------------------------- load generator


@dataclass
class Call:
    key: str
    text: str
    ttft: float  # request sent -> first token message
    prompt_tokens: int
    cached_tokens: int
    generated: int
    sent: int = 0  # characters of the prompt
    new: int = 0  # chat: len(prompt_k) - len(prompt_{k-1})
    new_answer: int = 0  # chat: of ``new``, the previous answer
    error: str = ""


async def one_shot(stub: Any, key: str, **fields: Any) -> Call:
    """A one-shot streaming Generate: its text, TTFT and usage."""
    import grpc

    from textgen.service.proto import textgen_pb2 as pb

    t0 = time.perf_counter()
    ttft = float("nan")
    parts: list[str] = []
    usage = pb.Usage()
    try:
        async for msg in stub.Generate(pb.GenerateRequest(**fields)):
            if msg.text:
                if not parts:
                    ttft = time.perf_counter() - t0
                parts.append(msg.text)
            if msg.HasField("usage"):
                usage = msg.usage
    except grpc.aio.AioRpcError as exc:
        return Call(key, "", ttft, 0, 0, 0, len(fields.get("prompt", "")), error=f"{exc.code().name} {exc.details()}")
    return Call(key, "".join(parts), ttft, usage.prompt_tokens, usage.cached_tokens, usage.generated_tokens,
                len(fields.get("prompt", "")))


async def drive(address: str, clients: int, body: Callable[[Any, int], Awaitable[list[Call]]]
                ) -> tuple[list[Call], float, float]:
    """``clients`` tasks running ``body(stub, index)`` from the same moment: their calls, the wall time and this
    process's CPU use (a fraction of one core) meanwhile."""
    import grpc

    from textgen.service.proto import textgen_pb2_grpc as pb_grpc

    channels = [grpc.aio.insecure_channel(address) for _ in range(max(1, clients // 32))]
    stubs = [pb_grpc.TextgenServiceStub(ch) for ch in channels]
    go = asyncio.Event()

    async def run(i: int) -> list[Call]:
        await go.wait()
        return await body(stubs[i % len(stubs)], i)

    tasks = [asyncio.create_task(run(i)) for i in range(clients)]
    await asyncio.sleep(0.2)  # every task waits on the event: they start together
    r0 = resource.getrusage(resource.RUSAGE_SELF)
    w0 = time.perf_counter()
    go.set()
    results = await asyncio.gather(*tasks)
    wall = time.perf_counter() - w0
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    for ch in channels:
        await ch.close()
    cpu = ((r1.ru_utime + r1.ru_stime) - (r0.ru_utime + r0.ru_stime)) / wall
    return [c for r in results for c in r], wall, cpu


def summarize(calls: list[Call], wall: float, cpu: float, texts: bool = True) -> dict[str, Any]:
    ok = [c for c in calls if not c.error]
    ttft = [c.ttft for c in ok if c.ttft == c.ttft]
    cached = [c.cached_tokens for c in ok]
    generated = sum(c.generated for c in ok)
    out: dict[str, Any] = {
        "calls": len(calls), "errors": len(calls) - len(ok), "first_error": next((c.error for c in calls if c.error),
                                                                               ""),
        "wall": wall, "client_cpu": cpu, "generated": generated, "tok_s": generated / wall,
        "ttft_p50": pct(ttft, 50), "ttft_p99": pct(ttft, 99), "sent": sum(c.sent for c in calls),
        "prompt_tokens": sum(c.prompt_tokens for c in ok), "cached_tokens": sum(cached),
        "fed": sum(c.prompt_tokens - c.cached_tokens for c in ok), "calls_with_cached": sum(1 for x in cached if x),
        "cached_min": min(cached, default=0), "cached_max": max(cached, default=0),
        "cached_mean": statistics.fmean(cached) if cached else 0.0,
        "new": sum(c.new for c in calls), "new_answer": sum(c.new_answer for c in calls)}
    if texts:  # a digest of every deterministic request's text, to compare runs
        out["texts"] = {c.key: hashlib.blake2b(c.text.encode(), digest_size=8).hexdigest() for c in ok}
    return out


async def load_shared(address: str, spec: dict[str, Any]) -> dict[str, Any]:
    instruction = shared_instruction(spec["instruction_chars"])

    async def body(stub: Any, i: int) -> list[Call]:
        return [await one_shot(stub, f"{i}/{k}", prompt=instruction + question(i, k), max_tokens=spec["tokens"],
                               temperature=0.0)
                for k in range(spec["calls"])]

    return summarize(*await drive(address, spec["clients"], body))


async def load_chat(address: str, spec: dict[str, Any]) -> dict[str, Any]:
    instruction = chat_instruction(spec["instruction_chars"])

    async def body(stub: Any, i: int) -> list[Call]:
        seed = spec["seed"] + 1000 * i
        rng = random.Random(seed)
        history, previous, answer = instruction, 0, 0
        calls: list[Call] = []
        for turn in range(1, spec["turns"] + 1):
            prompt = f"{history}User: {user_message(rng, turn)}\nAssistant:"
            call = await one_shot(stub, f"{i}/{turn}", prompt=prompt, max_tokens=spec["tokens"],
                                  temperature=spec["temperature"], seed=seed + turn)
            call.new, call.new_answer = len(prompt) - previous, answer
            calls.append(call)
            if call.error:
                break
            history, previous, answer = f"{prompt}{call.text}\n", len(prompt), len(call.text)
        return calls

    return summarize(*await drive(address, spec["clients"], body))


async def load_unique(address: str, spec: dict[str, Any]) -> dict[str, Any]:
    async def body(stub: Any, i: int) -> list[Call]:
        return [await one_shot(stub, f"{i}/{k}", prompt=unique_prompt(i, k, spec["prompt_chars"], spec["seed"]),
                               max_tokens=spec["tokens"], temperature=0.8, seed=spec["seed"] + 1000 * i + k)
                for k in range(spec["calls"])]

    return summarize(*await drive(address, spec["clients"], body))


async def load_fill(address: str, spec: dict[str, Any]) -> dict[str, Any]:
    """Unique prompts (max_tokens 1) from every client until ``seconds`` have passed."""
    deadline = time.perf_counter() + spec["seconds"]

    async def body(stub: Any, i: int) -> list[Call]:
        calls: list[Call] = []
        while time.perf_counter() < deadline:
            prompt = unique_prompt(i, len(calls), spec["prompt_chars"], spec["seed"])
            calls.append(await one_shot(stub, "", prompt=prompt, max_tokens=1, temperature=0.0))
        return calls

    return summarize(*await drive(address, spec["clients"], body), texts=False)


async def load_warm(address: str, spec: dict[str, Any]) -> dict[str, Any]:
    """Warm the server up through sessions (a 1-token prompt, then a Feed: never a fresh state, so the cache
    stays empty): the engine's buffers for this many clients and this prompt length."""
    from textgen.service.proto import textgen_pb2 as pb

    async def body(stub: Any, i: int) -> list[Call]:
        for k in range(spec["calls"]):
            sid = (await stub.CreateSession(pb.CreateSessionRequest(prompt="W"))).session.session_id
            await stub.Feed(pb.FeedRequest(session_id=sid, text=unique_prompt(i, k, spec["prompt_chars"], -1)))
            async for _ in stub.Generate(pb.GenerateRequest(session_id=sid, max_tokens=2)):
                pass
            await stub.DeleteSession(pb.DeleteSessionRequest(session_id=sid))
        return []

    _, wall, _ = await drive(address, spec["clients"], body)
    return {"wall": wall}


def vm_kib(pid: int | str, field: str = "VmRSS") -> int:
    m = re.search(rf"^{field}:\s+(\d+) kB", Path(f"/proc/{pid}/status").read_text(), re.M)
    return int(m.group(1)) if m else 0


def inproc_rss(spec: dict[str, Any]) -> dict[str, Any]:
    """Snapshots of ``prompts`` unique ``chars``-token prompts straight into a PrefixCache (a block entry every
    ``block`` tokens and the prompt's end, as service/fresh.py puts them): this process's RSS growth."""
    import numpy as np

    from textgen.service.prefix_cache import PrefixCache

    rng = np.random.default_rng(0)
    state = rng.standard_normal(spec["state_size"]).astype(np.float32)
    ids = rng.integers(1, 104, spec["chars"]).astype(np.int64)
    cache = PrefixCache(int(spec["budget_mb"] * MiB), spec["block"], b"bench/prefix_cache.py")  # the default policy
    gc.collect()
    rss0 = vm_kib("self")
    t0 = time.perf_counter()
    for i in range(spec["prompts"]):
        ids[0], ids[1], ids[2] = 1 + i % 103, 1 + i // 103 % 103, 1 + i // 10609 % 103  # unique from the start
        chains = cache.chains(ids)
        for length in [*range(spec["block"], spec["chars"], spec["block"]), spec["chars"]]:
            cache.put(ids, length, state, int(ids[length - 1]), chains)
    seconds = time.perf_counter() - t0
    gc.collect()
    return {"prompts": spec["prompts"], "entries": cache.entries, "bytes": cache.bytes, "evictions": cache.evictions,
            "budget_mb": spec["budget_mb"], "seconds": seconds, "rss_growth": (vm_kib("self") - rss0) * 1024,
            "peak_growth": (vm_kib("self", "VmHWM") - rss0) * 1024, "state_size": spec["state_size"]}


LOADS: dict[str, Callable[[str, dict[str, Any]], Coroutine[Any, Any, dict[str, Any]]]] = {
    "shared": load_shared, "chat": load_chat, "unique": load_unique, "rss": load_fill, "warm": load_warm}


def load_main(argv: list[str]) -> None:
    """``_load KIND ADDRESS SPEC``: one load (or ``inproc``) in this process; its figures as JSON on stdout."""
    kind, address, spec = argv[0], argv[1], json.loads(argv[2])
    r = inproc_rss(spec) if kind == "inproc" else asyncio.run(LOADS[kind](address, spec))
    print(json.dumps(r))


# --------------------------------------------------------------------------------------------- bench


def run_load(kind: str, address: str, spec: dict[str, Any]) -> dict[str, Any]:
    """One load in a load-generator process of its own (this file, ``_load``)."""
    out = subprocess.run([sys.executable, __file__, "_load", kind, address, json.dumps(spec)], capture_output=True,
                         text=True, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"load generator ({kind}) failed: {out.stderr[-2000:]}")
    if out.stderr.strip():
        print(out.stderr.strip()[-500:], file=sys.stderr)
    result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def snapshot(server: Server) -> dict[str, float]:
    """The server's prompt-cache metrics, its CPU seconds so far and its RSS (bytes)."""
    with urllib.request.urlopen(server.metrics_url, timeout=10) as r:
        text = r.read().decode()
    out = {key: sum(float(v) for v in re.findall(rf"^{name}(?:{{[^}}]*}})? (\S+)$", text, re.M))
           for key, name in METRICS.items()}
    out["cpu"] = server.cpu_seconds()
    out["rss"] = vm_kib(server.proc.pid) * 1024.0
    return out


def measure(scenario: str, mode: str, spec: dict[str, Any], warm: dict[str, Any], mb: float) -> dict[str, Any]:
    """A fresh server with the cache on (``mb``) or off, warmed up, then one load: its figures and the server's."""
    server = Server("default", "on", ["--prefix-cache-mb", f"{mb if mode == 'on' else 0:g}"])
    try:
        run_load("warm", server.address, warm)
        s0 = snapshot(server)
        r = run_load(scenario, server.address, spec)
        s1 = snapshot(server)
    finally:
        server.stop()
    r["server"] = {k: s1[k] if k in GAUGES else s1[k] - s0[k] for k in s1}
    r["server"].update(rss_before=s0["rss"], rss_after=s1["rss"])
    r["mode"] = mode
    return r


def order(k: int) -> tuple[str, str]:
    return ("on", "off") if k % 2 == 0 else ("off", "on")


def ms(seconds: float) -> str:
    return f"{seconds * 1e3:.0f} ms"


def hits(r: dict[str, Any]) -> str:
    s = r["server"]
    return f"{s['hits']:.0f}/{s['lookups']:.0f}"


def median(runs: list[dict[str, Any]], mode: str, key: str) -> float:
    values = [float(r[key]) for r in runs if r["mode"] == mode]
    return statistics.median(values) if values else float("nan")


def compare_texts(runs: list[dict[str, Any]]) -> dict[str, int]:
    """Texts of the same deterministic request in different runs: on against off, and within one mode."""
    out = {"on_off_compared": 0, "on_off_differ": 0, "same_mode_compared": 0, "same_mode_differ": 0}
    for a in range(len(runs)):
        for b in range(a + 1, len(runs)):
            ta, tb = runs[a].get("texts", {}), runs[b].get("texts", {})
            kind = "same_mode" if runs[a]["mode"] == runs[b]["mode"] else "on_off"
            common = ta.keys() & tb.keys()
            out[f"{kind}_compared"] += len(common)
            out[f"{kind}_differ"] += sum(1 for k in common if ta[k] != tb[k])
    return out


def texts_line(c: dict[str, int]) -> str:
    return (f"texts: on vs off differ in {c['on_off_differ']} of {c['on_off_compared']} request pairs; "
            f"same mode across rounds {c['same_mode_differ']} of {c['same_mode_compared']}")


Target = tuple[str, bool]


def table(*columns: str) -> None:
    print("| " + " | ".join(columns) + " |")
    print("|" + "---|" * len(columns), flush=True)


def run_rounds(scenario: str, args: argparse.Namespace, spec: dict[str, Any], warm: dict[str, Any],
               row: Callable[[dict[str, Any]], str], rounds: int | None = None) -> list[dict[str, Any]]:
    runs: list[dict[str, Any]] = []
    for k in range(args.rounds if rounds is None else rounds):
        for mode in order(k):
            r = measure(scenario, mode, spec, warm, args.cache_mb)
            r["round"] = k + 1
            runs.append(r)
            print(f"| {k + 1} | {mode} | {row(r)} |" + (f" first error: {r['first_error']}" if r["errors"] else ""),
                  flush=True)
    return runs


def sanity(name: str, runs: list[dict[str, Any]], texts: dict[str, int] | None, cached: bool) -> list[Target]:
    out: list[Target] = []
    errors = sum(r["errors"] for r in runs)
    out.append((f"{name}: no failed calls ({errors} failed)", errors == 0))
    if cached:
        on = [r["cached_tokens"] for r in runs if r["mode"] == "on"]
        out.append((f"{name}: the cache-on servers report cached_tokens > 0 (per run: {on})", all(x > 0 for x in on)))
    if texts is not None:
        print(texts_line(texts))
        out.append((f"{name}: the same text on and off ({texts['on_off_differ']} of {texts['on_off_compared']} "
                    f"request pairs differ; same mode {texts['same_mode_differ']})",
                    texts["on_off_differ"] == 0 and texts["same_mode_differ"] == 0 and texts["on_off_compared"] > 0))
    return out


def bench_shared(args: argparse.Namespace) -> dict[str, Any]:
    spec = {"instruction_chars": 4000, "clients": args.clients, "calls": args.shared_calls, "tokens": 20}
    print(f"\n# shared: a 4,000-character instruction + a different 50-character question per call; "
          f"{args.clients} clients x {args.shared_calls} one-shot Generates (max_tokens 20, greedy)", flush=True)
    table("round", "cache", "TTFT p50", "TTFT p99", "wall", "tok/s", "cached_tokens/call mean (min..max)",
          "calls with cached", "hits/lookups", "client CPU", "errors")
    runs = run_rounds("shared", args, spec, args.warm, lambda r: (
        f"{ms(r['ttft_p50'])} | {ms(r['ttft_p99'])} | {r['wall']:.2f} s | {r['tok_s']:.0f} | "
        f"{r['cached_mean']:.0f} ({r['cached_min']}..{r['cached_max']}) | {r['calls_with_cached']}/{r['calls']} | "
        f"{hits(r)} | {r['client_cpu'] * 100:.0f}% | {r['errors']}"))
    print()
    ratios = summary_table(runs, (("TTFT p50", "ttft_p50", ms), ("TTFT p99", "ttft_p99", ms),
                                  ("wall", "wall", lambda x: f"{x:.2f} s"), ("tok/s", "tok_s", lambda x: f"{x:.0f}")))
    texts = compare_texts(runs)
    speedup = 1 / ratios["ttft_p50"]
    targets = [(f"shared: TTFT p50 off / on = {speedup:.1f}x (target >= 10x)", speedup >= 10),
               *sanity("shared", runs, texts, cached=True)]
    return {"spec": spec, "runs": runs, "texts": texts, "ttft_p50_speedup": speedup, "targets": targets}


def summary_table(runs: list[dict[str, Any]], figures: tuple[tuple[str, str, Callable[[float], str]], ...]
                  ) -> dict[str, float]:
    """Medians over the rounds, on and off, and their ratio on / off."""
    table("figure", "on (median)", "off (median)", "on / off")
    ratios: dict[str, float] = {}
    for label, key, fmt in figures:
        on, off = median(runs, "on", key), median(runs, "off", key)
        ratios[key] = on / off if off else float("nan")
        print(f"| {label} | {fmt(on)} | {fmt(off)} | {ratios[key]:.3f}x |")
    return ratios


def bench_chat(args: argparse.Namespace) -> dict[str, Any]:
    spec = {"instruction_chars": 500, "clients": args.chat_conversations, "turns": args.chat_turns, "tokens": 60,
            "temperature": 0.7, "seed": 7}
    print(f"\n# chat: {args.chat_conversations} stateless conversations at once, {args.chat_turns} turns each, every "
          "turn re-sends the conversation (a ~500-character instruction, the answers as received) + a ~60-character "
          "message; one-shot Generate, max_tokens 60, temperature 0.7, seeded", flush=True)
    table("round", "cache", "calls", "chars sent", "new chars", "new: previous answers", "new: client text",
          "chars fed", "fed / new", "fed / client text", "TTFT p50", "TTFT p99", "hits/lookups", "errors")
    runs = run_rounds("chat", args, spec, args.warm, lambda r: (
        f"{r['calls']} | {r['sent']:,} | {r['new']:,} | {r['new_answer']:,} | {r['new'] - r['new_answer']:,} | "
        f"{r['fed']:,} | {r['fed'] / r['new']:.3f} | {r['fed'] / max(1, r['new'] - r['new_answer']):.3f} | "
        f"{ms(r['ttft_p50'])} | {ms(r['ttft_p99'])} | {hits(r)} | {r['errors']}"))
    print()
    ratios = summary_table(runs, (("TTFT p50", "ttft_p50", ms), ("TTFT p99", "ttft_p99", ms),
                                  ("chars fed", "fed", lambda x: f"{x:,.0f}")))
    on = [r for r in runs if r["mode"] == "on"]
    fed, new = sum(r["fed"] for r in on), sum(r["new"] for r in on)
    client = new - sum(r["new_answer"] for r in on)
    print(f"cache on, all rounds: fed {fed:,} characters of {sum(r['sent'] for r in on):,} sent; "
          f"fed / all new characters (previous answers + client text) = {fed / new:.3f}; "
          f"fed / the client's new text only = {fed / max(1, client):.3f}")
    texts = compare_texts(runs)
    targets = [(f"chat: characters fed / new characters (answers + client text) = {fed / new:.3f} (target "
                f"<= 1.2; fed / the client's new text only = {fed / max(1, client):.3f}, not a target)",
                fed <= 1.2 * new),
               *sanity("chat", runs, texts, cached=True)]
    return {"spec": spec, "runs": runs, "texts": texts, "fed_over_new": fed / new,
            "fed_over_client_text": fed / max(1, client), "ttft_p50_on_over_off": ratios["ttft_p50"],
            "targets": targets}


def cpu_per_1k(r: dict[str, Any]) -> float:
    return float(r["server"]["cpu"]) / max(1, r["generated"]) * 1e3


def bench_unique(args: argparse.Namespace) -> dict[str, Any]:
    spec = {"clients": args.clients, "calls": args.unique_calls, "prompt_chars": 200, "tokens": 200, "seed": 11}
    print(f"\n# unique: 0% hits; {args.clients} clients x {args.unique_calls} one-shot Generates of unique "
          f"200-character prompts (max_tokens 200, temperature 0.8, seeded); {args.unique_rounds} rounds", flush=True)
    table("round", "cache", "tokens", "wall", "gen tok/s", "server CPU s / 1k tok", "TTFT p50", "TTFT p99",
          "hits/lookups", "entries", "client CPU", "errors")
    runs = run_rounds("unique", args, spec, args.warm, lambda r: (
        f"{r['generated']:,} | {r['wall']:.2f} s | {r['tok_s']:.0f} | {cpu_per_1k(r):.3f} | {ms(r['ttft_p50'])} | "
        f"{ms(r['ttft_p99'])} | {hits(r)} | {r['server']['entries']:.0f} | {r['client_cpu'] * 100:.0f}% | "
        f"{r['errors']}"), args.unique_rounds)
    print()
    table("round", "gen tok/s on / off", "server CPU per token on / off")
    rounds: list[tuple[float, float]] = []
    for k in range(1, args.unique_rounds + 1):
        pair = {r["mode"]: r for r in runs if r["round"] == k}
        rounds.append((pair["on"]["tok_s"] / pair["off"]["tok_s"], cpu_per_1k(pair["on"]) / cpu_per_1k(pair["off"])))
        print(f"| {k} | {rounds[-1][0]:.3f}x | {rounds[-1][1]:.3f}x |")
    tok, cpu = statistics.median(r[0] for r in rounds), statistics.median(r[1] for r in rounds)
    print(f"| median | {tok:.3f}x | {cpu:.3f}x |")
    texts = compare_texts(runs)
    hit = sum(r["server"]["hits"] for r in runs)
    targets = [(f"unique: gen tok/s on / off = {tok:.3f}x, median of {len(rounds)} rounds (target >= 0.97x; "
                f"server CPU per token on / off {cpu:.3f}x)", tok >= 0.97),
               (f"unique: no cache hits ({hit:.0f})", hit == 0), *sanity("unique", runs, texts, cached=False)]
    return {"spec": spec, "runs": runs, "texts": texts, "round_ratios": rounds, "tok_s_ratio": tok, "cpu_ratio": cpu,
            "targets": targets}


def bench_rss(args: argparse.Namespace) -> dict[str, Any]:
    spec = {"clients": 32, "seconds": args.rss_seconds, "prompt_chars": 2000, "seed": 13}
    budget = args.rss_budget_mb * MiB
    print(f"\n# rss: unique 2,000-character one-shot Generates (max_tokens 1, 32 clients) for {args.rss_seconds:g} s, "
          f"budget --prefix-cache-mb {args.rss_budget_mb:g} (the default of --rss-budget-mb is 16, not 64: it fills "
          f"within the time); VmRSS of the server after a warm-up that does not touch the cache, and at the end",
          flush=True)
    table("cache", "prompts", "chars fed", "entries", "cache bytes", "evictions", "RSS before", "RSS after",
          "RSS growth")
    runs: list[dict[str, Any]] = []
    for mode in ("on", "off"):
        r = measure("rss", mode, spec, {"clients": 32, "calls": 2, "prompt_chars": 2000}, args.rss_budget_mb)
        runs.append(r)
        s = r["server"]
        print(f"| {mode} | {r['calls']:,} | {r['fed']:,} | {s['entries']:.0f} | {s['bytes'] / MiB:.2f} MiB | "
              f"{s['evictions']:,.0f} | {s['rss_before'] / MiB:.1f} MiB | {s['rss_after'] / MiB:.1f} MiB | "
              f"{s['rss'] / MiB:+.1f} MiB |" + (f" errors: {r['errors']} {r['first_error']}" if r["errors"] else ""),
              flush=True)
    growth = runs[0]["server"]["rss"] - runs[1]["server"]["rss"]
    full = runs[0]["server"]["evictions"] > 0
    print(f"server RSS growth, cache on - cache off: {growth / MiB:+.1f} MiB against a budget of "
          f"{args.rss_budget_mb:g} MiB ({growth / budget:.2f}x); the cache {'filled' if full else 'did NOT fill'}")
    inproc = bench_inproc(args)
    ib = inproc["budget_mb"] * MiB
    targets = [(f"rss (server, {args.rss_seconds:g} s, budget {args.rss_budget_mb:g} MiB): RSS growth on - off = "
                f"{growth / MiB:.1f} MiB = {growth / budget:.2f}x the budget (target <= 1.1x; cache filled: {full})",
                growth <= 1.1 * budget and full),
               (f"rss (in process, {inproc['prompts']:,} prompts, budget {inproc['budget_mb']:g} MiB): RSS growth "
                f"{inproc['rss_growth'] / MiB:.1f} MiB = {inproc['rss_growth'] / ib:.2f}x the budget (target <= 1.1x)",
                inproc["rss_growth"] <= 1.1 * ib), *sanity("rss", runs, None, cached=False)]
    return {"spec": spec, "runs": runs, "growth_on_minus_off": growth, "inproc": inproc, "targets": targets}


def bench_inproc(args: argparse.Namespace) -> dict[str, Any]:
    bundle = default_bundle()
    state_size = json.loads((bundle / "manifest.json").read_text())["state_size"] if bundle else 256
    spec = {"prompts": args.inproc_prompts, "chars": 2000, "block": 256, "budget_mb": 64.0, "state_size": state_size}
    r = run_load("inproc", "", spec)
    print(f"\n# rss, in process (no model, no server): {r['prompts']:,} unique 2,000-token prompts' snapshots "
          f"(block 256: 8 entries each, states of {state_size} float32) put straight into PrefixCache, budget "
          f"{r['budget_mb']:g} MiB", flush=True)
    table("prompts", "entries", "cache bytes", "evictions", "seconds", "RSS growth", "peak RSS growth",
          "RSS growth / budget")
    print(f"| {r['prompts']:,} | {r['entries']:,} | {r['bytes'] / MiB:.2f} MiB | {r['evictions']:,} | "
          f"{r['seconds']:.1f} | {r['rss_growth'] / MiB:.1f} MiB | {r['peak_growth'] / MiB:.1f} MiB | "
          f"{r['rss_growth'] / (r['budget_mb'] * MiB):.2f}x |", flush=True)
    return r


BENCHES: dict[str, Callable[[argparse.Namespace], dict[str, Any]]] = {
    "shared": bench_shared, "chat": bench_chat, "unique": bench_unique, "rss": bench_rss}
QUICK = {"rounds": 1, "clients": 16, "shared_calls": 2, "chat_conversations": 4, "chat_turns": 5, "unique_calls": 6,
         "unique_rounds": 2, "rss_seconds": 20.0, "inproc_prompts": 20_000}
DEFAULTS = {"rounds": 2, "clients": 64, "shared_calls": 4, "chat_conversations": 8, "chat_turns": 10,
            "unique_calls": 24, "unique_rounds": 6, "rss_seconds": 120.0, "inproc_prompts": 100_000}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scenarios", default=",".join(SCENARIOS), help=f"some of {','.join(SCENARIOS)}")
    p.add_argument("--quick", action="store_true", help=f"a ~2-minute smoke run: {QUICK} unless given")
    p.add_argument("--rounds", type=int, help="on/off pairs per scenario (rss: one pair), alternating the order (2)")
    p.add_argument("--cache-mb", type=float, default=64.0, help="--prefix-cache-mb of the cache-on servers")
    p.add_argument("--clients", type=int, help="concurrent clients of shared and unique (64)")
    p.add_argument("--shared-calls", type=int, help="one-shot Generates per client in shared (4)")
    p.add_argument("--chat-conversations", type=int, help="conversations at once in chat (8)")
    p.add_argument("--chat-turns", type=int, help="turns per conversation (10)")
    p.add_argument("--unique-calls", type=int, help="one-shot Generates per client in unique (24)")
    p.add_argument("--unique-rounds", type=int, help="on/off pairs of unique, whose ratio is small and noisy (6)")
    p.add_argument("--rss-seconds", type=float, help="seconds of load per rss server (120)")
    p.add_argument("--rss-budget-mb", type=float, default=16.0,
                   help="--prefix-cache-mb of the rss scenario's cache-on server (16: it fills within the time)")
    p.add_argument("--inproc-prompts", type=int, help="prompts of the in-process rss measurement (100000)")
    p.add_argument("--json", default=None, help="write the raw figures here")
    a = p.parse_args()
    for key, value in (QUICK if a.quick else DEFAULTS).items():
        if getattr(a, key) is None:
            setattr(a, key, value)
    a.warm = {"clients": 16, "calls": 1, "prompt_chars": 500}
    unknown = set(a.scenarios.split(",")) - set(SCENARIOS)
    if unknown:
        p.error(f"unknown scenarios {sorted(unknown)}: choose among {','.join(SCENARIOS)}")
    return a


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "_load":
        load_main(sys.argv[2:])
        return
    args = parse_args()
    t0 = time.perf_counter()
    print(f"# bench/prefix_cache.py: default bundle, one process; cache on = --prefix-cache-mb {args.cache_mb:g} "
          f"(block 256), off = --prefix-cache-mb 0; {args.rounds} round(s) of on/off, alternating the order"
          + (" (--quick)" if args.quick else ""), flush=True)
    report: dict[str, Any] = {"command": " ".join(sys.argv), "args": {k: v for k, v in vars(args).items()}}
    targets: list[Target] = []
    for name in [s for s in SCENARIOS if s in args.scenarios.split(",")]:
        report[name] = BENCHES[name](args)
        targets += report[name]["targets"]
    print(f"\n# targets ({time.perf_counter() - t0:.0f} s in all)")
    for text, met in targets:
        print(f"{'MET    ' if met else 'NOT MET'}  {text}")
    report["targets"] = [{"target": text, "met": met} for text, met in targets]
    report["seconds"] = time.perf_counter() - t0
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1, default=str))


if __name__ == "__main__":
    main()
