"""The ``textgen`` command line. Each subcommand turns user errors into one line on stderr and exit 1.

Training subcommands (train, eval, sample, export) need the ``train`` extra; without it they say how to
install it and exit 1. Everything else runs on the torch-free runtime install.
"""

from __future__ import annotations

import functools
import shlex
import sys
from collections.abc import Callable
from typing import Any

import click

TRAIN_EXTRA_HINT = "this command needs the training extra (torch): pip install 'textgen[train]'"


def _fail(message: str, code: int = 1) -> None:
    click.echo(f"textgen: error: {message}", err=True)
    sys.exit(code)


def user_errors(func: Callable[..., Any]) -> Callable[..., Any]:
    """The one boundary where the project's exceptions become a single line and a non-zero exit."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from textgen.training.errors import TrainingError

        try:
            return func(*args, **kwargs)
        except TrainingError as exc:
            _fail(str(exc))
        except _user_error_types() as exc:
            _fail(str(exc), getattr(exc, "exit_code", 1))
        except KeyboardInterrupt:
            _fail("interrupted")

    return wrapper


def _user_error_types() -> tuple[type[BaseException], ...]:
    """Exception types of the runtime side that carry a user-facing message (imported lazily)."""
    try:
        from textgen.service.errors import TextgenError
    except ImportError:  # pragma: no cover - during bootstrap only
        return ()
    return (TextgenError,)


def require_torch() -> None:
    try:
        import torch  # noqa: F401
    except ImportError:
        _fail(TRAIN_EXTRA_HINT)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="textgen")
def main() -> None:
    """textgen: train, export, serve and score character-level recurrent language models."""


# ---------------------------------------------------------------------------------------------- training


def _train_options(func: Callable[..., Any]) -> Callable[..., Any]:
    """One option per :class:`TrainConfig` field, from its help and choices (keyword = field name).

    Every default is None, so that ``train`` knows which options were given; help shows TrainConfig's default.
    """
    import dataclasses

    from textgen.training.config import TrainConfig  # torch-free

    types: dict[str, type] = {"int": int, "float": float, "str": str}
    for f in reversed(dataclasses.fields(TrainConfig)):
        choices = f.metadata.get("choices")
        kind: Any = click.Choice(list(choices)) if choices else types[str(f.type)]
        flag = f.metadata.get("flag") or "--" + f.name.replace("_", "-")
        default = f"{f.default:g}" if isinstance(f.default, float) else f.default
        func = click.option(flag, f.name, type=kind, default=None, multiple=bool(f.metadata.get("multiple")),
                            help=f"{f.metadata['help']}  [default: {default}]")(func)
    return func


@main.command()
@_train_options
@click.option("--resume", type=click.Path(), default=None, help="Continue the run saved in this checkpoint.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@user_errors
def train(resume: str | None, quiet: bool, **options: Any) -> None:
    """Train a model; writes best.pt, last.pt, metrics.jsonl and curves.png to --out."""
    require_torch()
    from textgen.training.config import RESUME_OVERRIDES, TrainConfig
    from textgen.training.train import train as run

    given = {k: v for k, v in options.items() if v is not None and v != ()}  # (): a repeatable option not given
    if resume is not None:
        unknown = set(given) - set(RESUME_OVERRIDES)
        if unknown:
            allowed = ", ".join("--out" if k == "out_dir" else "--" + k.replace("_", "-") for k in RESUME_OVERRIDES)
            raise click.UsageError(f"--resume continues a run as it was configured; only {allowed} may be given "
                                   "with it")
    if "time_budget" in given and "max_steps" not in given:
        given["max_steps"] = 0  # a time budget alone limits the run; the default step limit does not apply
    cfg = TrainConfig(**given)
    command = "textgen " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    run(cfg, resume_from=resume, command=command, show_progress=False if quiet else None)


@main.command("eval")
@click.argument("checkpoint", type=click.Path())
@click.option("--text", "text_source", default="pydoc",
              help="A UTF-8 file, a folder of .txt files, or 'pydoc'.")
@click.option("--held-out", is_flag=True, help="Score only the last 10% of the text (the validation split).")
@click.option("--streams", type=int, default=1, show_default=True,
              help="Score as this many side-by-side streams (1 = the exact whole-text figure).")
@user_errors
def eval_command(checkpoint: str, text_source: str, held_out: bool, streams: int) -> None:
    """Perplexity and bits per character of CHECKPOINT on a text."""
    require_torch()
    import torch

    from textgen.training.checkpoint import load_checkpoint
    from textgen.training.corpus import load_corpus
    from textgen.training.train import evaluate, figures

    ckpt = load_checkpoint(checkpoint)
    corpus = load_corpus(text_source)
    text = corpus.split()[1] if held_out else corpus.text
    ids = torch.from_numpy(ckpt.vocab.encode(text))
    if len(ids) < 2:
        raise click.UsageError("the text must have at least two characters")
    f = figures(*evaluate(ckpt.build_model(), ids, streams))
    unknown = len(ckpt.vocab.unknown_chars(text))
    click.echo(f"{text_source}{' (held out)' if held_out else ''}: {len(ids) - 1:,} predictions, "
               f"loss {f['loss']:.4f} nats/char, perplexity {f['perplexity']:.3f}, {f['bpc']:.4f} bits/char"
               f"{f', {unknown} distinct unknown characters' if unknown else ''}")


@main.command()
@click.argument("checkpoint", type=click.Path())
@click.option("--prefix", default="The ", show_default=True, help="Text that warms the state up.")
@click.option("--length", type=int, default=200, show_default=True, help="Characters to generate.")
@click.option("--temperature", type=float, default=0.0, show_default=True, help="0 = greedy.")
@click.option("--seed", type=int, default=0, show_default=True)
@user_errors
def sample(checkpoint: str, prefix: str, length: int, temperature: float, seed: int) -> None:
    """Warm the state up on --prefix, then generate (greedy or with temperature)."""
    require_torch()
    from textgen.training.checkpoint import load_checkpoint
    from textgen.training.sample import predict

    if temperature < 0:
        raise click.BadParameter("must be >= 0", param_hint="--temperature")
    if not prefix:
        raise click.BadParameter("must not be empty", param_hint="--prefix")
    ckpt = load_checkpoint(checkpoint)
    click.echo(prefix + predict(ckpt.build_model(), ckpt.vocab, prefix, length, temperature, seed))


# ----------------------------------------------------------------------------------------------- bundles


@main.command("export")
@click.argument("checkpoint", type=click.Path())
@click.argument("out_dir", type=click.Path())
@click.option("--no-variants", is_flag=True,
              help="Write only model.onnx, not model_last.onnx and model_step.onnx.")
@click.option("--force", is_flag=True, help="Replace OUT_DIR if it already holds a bundle.")
@user_errors
def export_command(checkpoint: str, out_dir: str, no_variants: bool, force: bool) -> None:
    """Export CHECKPOINT to a bundle in OUT_DIR, checked against the torch model (docs/bundle.md)."""
    require_torch()
    from textgen.training.export import export_checkpoint

    m = export_checkpoint(checkpoint, out_dir, variants=not no_variants, overwrite=force)
    graphs = [name for name in m.sha256 if name.endswith(".onnx")]
    verb = "match" if len(graphs) > 1 else "matches"
    click.echo(f"{out_dir}: {m.cell} {m.num_layers}x{m.hidden_size}, vocab {m.vocab_size}, opset {m.opset}; "
               f"{', '.join(graphs)} (weights in weights.bin) {verb} the torch model (parity checked)")


@main.command()
@click.argument("bundle", required=False, type=click.Path())
@click.option("--json", "as_json", is_flag=True, help="Print manifest.json as JSON instead.")
@user_errors
def info(bundle: str | None, as_json: bool) -> None:
    """Verify BUNDLE (default: the packaged bundle) and print its manifest."""
    from textgen.service.bundle import format_manifest
    from textgen.service.runtime import load_bundle

    rt = load_bundle(bundle, intra_op_threads=1)
    if as_json:
        click.echo(rt.manifest.to_json_text(), nl=False)
    else:
        click.echo(format_manifest(rt.manifest, rt.path))


# ----------------------------------------------------------------------------------------------- service


def _server_options(func: Callable[..., Any]) -> Callable[..., Any]:
    from textgen.service.config import click_options

    return click_options(func)


@main.command()
@_server_options
@user_errors
def serve(**options: Any) -> None:
    """Serve a bundle over gRPC (default: the packaged model). Every option also reads TEXTGEN_<NAME>.

    Prints the bound addresses on one line, then logs one line per request to stderr. SIGTERM or SIGINT
    shuts down gracefully (docs/api.md).
    """
    import asyncio

    from textgen.service.config import ProcessPlan, ServerConfig
    from textgen.service.heap import limit_malloc_arenas

    limit_malloc_arenas()  # before any thread of the server starts
    config = ServerConfig(**options)
    plan = config.processes()
    if plan.split and not (config.workers or config.shards) and not _writable_tempdir():
        # e.g. a read-only root file system without a /tmp volume: what was chosen needs a private folder
        plan = ProcessPlan(1, 1, False, f"{plan.why}, but no writable temporary folder (TMPDIR) for their "
                                        "sockets: one process")
    config = config.replace(workers=plan.workers, shards=plan.shards)
    if plan.split:
        from textgen.service.procs.supervisor import serve_processes as run
    else:
        from textgen.service.server import serve as run
    sys.exit(asyncio.run(run(config, why=plan.why)))


def _writable_tempdir() -> bool:
    import tempfile

    try:
        tempfile.TemporaryDirectory(prefix="textgen-probe-").cleanup()
    except OSError:
        return False
    return True


_address_option = click.option("--address", envvar="TEXTGEN_ADDRESS", default="localhost:50051",
                               show_default=True, show_envvar=True, help="host:port of a running textgen serve.")

# The client's TLS and token options (docs/api.md, Security). The certificate's variables are not
# TEXTGEN_TLS_CERT/KEY: those are the server's own certificate, and a HEALTHCHECK next to the server must not
# present it as a client certificate.
CLIENT_ENV = {"tls": "TEXTGEN_TLS", "tls_ca": "TEXTGEN_TLS_CA", "tls_cert": "TEXTGEN_CLIENT_CERT",
              "tls_key": "TEXTGEN_CLIENT_KEY", "tls_server_name": "TEXTGEN_TLS_SERVER_NAME", "token": "TEXTGEN_TOKEN"}


def _client_security_options(func: Callable[..., Any]) -> Callable[..., Any]:
    options = [
        click.option("--tls", is_flag=True, envvar=CLIENT_ENV["tls"], show_envvar=True,
                     help="Connect over TLS, trusting the system's CAs (implied by the other --tls-* options)."),
        click.option("--tls-ca", envvar=CLIENT_ENV["tls_ca"], show_envvar=True,
                     help="Connect over TLS, trusting this PEM CA certificate (e.g. a private CA)."),
        click.option("--tls-cert", envvar=CLIENT_ENV["tls_cert"], show_envvar=True,
                     help="Client certificate (PEM) for a server that requires one (mutual TLS)."),
        click.option("--tls-key", envvar=CLIENT_ENV["tls_key"], show_envvar=True,
                     help="Private key (PEM) of --tls-cert."),
        click.option("--tls-server-name", envvar=CLIENT_ENV["tls_server_name"], show_envvar=True,
                     help="Name to check the server's certificate against, when it differs from --address's host."),
        click.option("--token", envvar=CLIENT_ENV["token"], show_envvar=True,
                     help="Bearer token for a server with --auth-tokens-file (prefer the variable: "
                          "arguments show in the process list)."),
    ]
    for option in reversed(options):
        func = option(func)
    return func


@main.command()
@click.argument("prompt")
@_address_option
@click.option("--max-tokens", type=int, default=200, show_default=True, help="Tokens (characters) to generate.")
@click.option("--temperature", type=float, default=0.8, show_default=True, help="0 = greedy.")
@click.option("--top-k", type=int, default=0, show_default=True, help="0 = no limit.")
@click.option("--top-p", type=float, default=1.0, show_default=True, help="Nucleus sampling mass, in (0, 1].")
@click.option("--seed", type=int, default=None, help="Same seed, same text (default: the server picks one).")
@click.option("--stop", multiple=True, help="Stop after this string (repeatable).")
@click.option("--session", "session_id", default="", help="Continue this session instead of a one-shot call.")
@click.option("--timeout", type=float, default=None, help="Deadline of the call in seconds.")
@click.option("--echo/--no-echo", default=True, show_default=True, help="Print the prompt before the text.")
@click.option("-v", "--verbose", is_flag=True, help="Print the finish reason, usage and seed to stderr.")
@_client_security_options
@user_errors
def generate(prompt: str, address: str, max_tokens: int, temperature: float, top_k: int, top_p: float,
             seed: int | None, stop: tuple[str, ...], session_id: str, timeout: float | None, echo: bool,
             verbose: bool, **security: Any) -> None:
    """Stream text generated after PROMPT by a running server to the terminal."""
    from textgen.service.client import FINISH_NAMES, TextgenClient

    with TextgenClient(address, timeout=timeout, **security) as client:
        stream = client.generate(prompt, session_id=session_id, max_tokens=max_tokens, temperature=temperature,
                                 top_k=top_k, top_p=top_p, seed=seed, stop=stop)
        if echo:
            click.echo(prompt, nl=False)
        try:
            for chunk in stream:
                click.echo(chunk, nl=False)
        except KeyboardInterrupt:
            stream.cancel()
            raise
        finally:
            click.echo()  # end the text's line, also before an error message
        if verbose and stream.final is not None:
            u = stream.final.usage
            click.echo(f"[finish: {FINISH_NAMES[stream.final.finish_reason]}, prompt {u.prompt_tokens} tokens, "
                       f"generated {u.generated_tokens}, seed {stream.final.seed}]", err=True)


@main.command()
@_address_option
@click.option("--service", default="", help="Service name to check (default: the whole server).")
@click.option("--timeout", type=float, default=5.0, show_default=True, help="Seconds to wait for the answer.")
@_client_security_options
@user_errors
def health(address: str, service: str, timeout: float, **security: Any) -> None:
    """Exit 0 if the server at --address is SERVING, else print its status and exit 1."""
    from textgen.service.client import TextgenClient

    with TextgenClient(address, **security) as client:
        status = client.health(service, timeout=timeout)
    click.echo(status)
    if status != "SERVING":
        sys.exit(1)


# ----------------------------------------------------------------------------------------------- scoring


@main.command("score")
@click.argument("input_path", metavar="INPUT")
@click.option("-o", "--output", default=None, help="Rows file (.jsonl or .csv); default: JSONL to stdout.")
@click.option("--model", default=None, help="Bundle directory (default: the packaged bundle).")
@click.option("--text-field", default="text", show_default=True, help="JSONL field holding the text.")
@click.option("--id-field", default="id", show_default=True, help="JSONL field holding the id (default id: line).")
@click.option("--input-format", type=click.Choice(["auto", "jsonl", "text"]), default="auto", show_default=True,
              help="auto: a folder of .txt files, .jsonl/.ndjson/.json as JSONL, any other file as one document.")
@click.option("--format", "fmt", type=click.Choice(["jsonl", "csv"]), default=None,
              help="Output format (default: from the extension of -o, else jsonl).")
@click.option("--workers", type=int, default=None, help="Worker processes or Ray actors (default: the cores).")
@click.option("--threads", type=int, default=None, help="onnxruntime threads per worker (default: cores // workers).")
@click.option("--batch-size", type=int, default=64, show_default=True, help="Documents per length bucket.")
@click.option("--chunk", type=int, default=256, show_default=True, help="Tokens per forward pass (state carried).")
@click.option("--resume", is_flag=True, help="Continue an interrupted run of the same command.")
@click.option("--force", is_flag=True, help="Replace an existing output.")
@click.option("--errors", "errors_path", default=None, help="Bad rows file (default: OUTPUT.errors.jsonl).")
@click.option("--engine", type=click.Choice(["local", "ray"]), default="local", show_default=True)
@click.option("--address", default=None, help="Ray cluster to attach to (--engine ray; default: start one here).")
@click.option("--progress/--no-progress", default=None, help="Progress bar (default: on a terminal).")
@user_errors
def score(input_path: str, output: str | None, fmt: str | None, errors_path: str | None, **options: Any) -> None:
    """Perplexity of every document of INPUT: a text file, a folder of .txt files, JSONL, or - (JSONL on stdin).

    Writes one row per document in input order, and OUTPUT.summary.json. Exit status: 0 all documents scored,
    3 some rows could not be scored (see the errors file), 1 error (docs/scoring.md).
    """
    from textgen.service.scoring.job import ScoreJob, format_summary, run_job

    job = ScoreJob(input_path, output=output, format=fmt, errors=errors_path, **options)
    summary = run_job(job)
    click.echo(format_summary(summary), err=True)
    if summary["failed"]:
        sys.exit(3)
