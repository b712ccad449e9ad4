"""Static checks of the container files (Dockerfile, docker-compose.yml, deploy/prometheus.yml).

They keep the image's configuration in step with the service's settings: a renamed TEXTGEN_* variable or a
changed default port breaks a test here instead of a deployment. Building and running the image is
.ci/container-smoke's job (it needs the container tool).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from textgen.service.cli import CLIENT_ENV
from textgen.service.config import SETTINGS, ServerConfig, click_options

ROOT = Path(__file__).resolve().parent.parent
KNOWN_ENV = {s.env for s in SETTINGS} | {"TEXTGEN_ADDRESS"} | set(CLIENT_ENV.values())
DOCKER_STOP_TIMEOUT = 10.0  # seconds `docker stop` waits before SIGKILL, by default


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of the Dockerfile, continuation lines joined, comments dropped."""
    text = (ROOT / "Dockerfile").read_text()
    lines = [ln for ln in text.splitlines() if not ln.lstrip().startswith("#")]
    joined = re.sub(r"\\\n", " ", "\n".join(lines))
    out = []
    for line in joined.splitlines():
        if line.strip():
            word, _, rest = line.strip().partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def stages() -> list[list[tuple[str, str]]]:
    result: list[list[tuple[str, str]]] = []
    for ins in instructions():
        if ins[0] == "FROM":
            result.append([])
        if result:
            result[-1].append(ins)
    return result


def runtime_env() -> dict[str, str]:
    env: dict[str, str] = {}
    for word, rest in stages()[-1]:
        if word == "ENV":
            env.update(dict(re.findall(r"(\w+)=(\S+)", rest)))
    return env


def test_multi_stage_runtime_on_python_slim_without_training_stack():
    st = stages()
    assert len(st) >= 2
    assert st[-1][0][1].split()[0] == "python:3.11-slim"
    runtime_runs = " ".join(rest for word, rest in st[-1] if word == "RUN")
    assert "torch" not in runtime_runs and "[train" not in runtime_runs
    assert "apt-get" not in runtime_runs  # no compilers or build tools
    assert all("--no-cache-dir" in cmd for cmd in re.findall(r"pip[^&]* install[^&]*", runtime_runs))


def test_dependencies_are_installed_before_the_code():
    words = stages()[-1]
    deps = next(i for i, (w, r) in enumerate(words) if w == "RUN" and "requirements" in r)
    wheel = next(i for i, (w, r) in enumerate(words) if w == "COPY" and "/wheels" in r)
    assert deps < wheel
    assert "--no-deps" in words[wheel + 1][1]


def test_non_root_user_ports_health_and_entrypoint():
    runtime = stages()[-1]
    env = runtime_env()
    users = [rest for word, rest in runtime if word == "USER"]
    assert users, "the runtime stage must set USER"
    uid = users[-1].split(":")[0]
    assert uid.isdigit() and int(uid) != 0, "USER must be a numeric non-root uid (runAsNonRoot)"

    exposed = {int(p.split("/")[0]) for word, rest in runtime if word == "EXPOSE" for p in rest.split()}
    assert exposed == {int(env["TEXTGEN_PORT"]), int(env["TEXTGEN_METRICS_PORT"]), int(env["TEXTGEN_HTTP_PORT"])}
    assert env["TEXTGEN_HOST"] in ("0.0.0.0", "[::]")

    health = next(rest for word, rest in runtime if word == "HEALTHCHECK")
    assert "textgen health" in health and "TEXTGEN_PORT" in health

    entrypoint = next(rest for word, rest in runtime if word == "ENTRYPOINT")
    assert json.loads(entrypoint) == ["textgen", "serve"]  # exec form: the server itself gets SIGTERM


def test_image_environment_uses_known_settings_and_drains_before_docker_kills():
    env = runtime_env()
    textgen_vars = {k for k in env if k.startswith("TEXTGEN_")}
    assert textgen_vars <= KNOWN_ENV, f"unknown settings: {textgen_vars - KNOWN_ENV}"
    assert float(env["TEXTGEN_GRACE_SECONDS"]) < DOCKER_STOP_TIMEOUT


def test_image_environment_is_a_valid_configuration_reachable_from_outside():
    """`docker run -p` works: gRPC plaintext on all interfaces is allowed explicitly, metrics listen on all too."""
    import click
    from click.testing import CliRunner

    seen: dict[str, ServerConfig] = {}

    @click.command()
    @click_options
    def serve(**options: object) -> None:
        seen["cfg"] = ServerConfig(**options)  # type: ignore[arg-type]

    result = CliRunner().invoke(serve, [], env=runtime_env())
    assert result.exit_code == 0, result.output
    cfg = seen["cfg"]
    assert cfg.insecure and not cfg.tls and cfg.metrics_host in ("0.0.0.0", "[::]")


def test_dockerignore_keeps_the_context_small():
    rules = [ln.strip() for ln in (ROOT / ".dockerignore").read_text().splitlines()
             if ln.strip() and not ln.startswith("#")]
    assert rules[0] == "*", "allow-list: exclude everything, then name what the build needs"
    allowed = {r[1:].rstrip("/") for r in rules if r.startswith("!")}
    copied = set()
    for word, rest in instructions():
        if word == "COPY" and "--from" not in rest:
            copied.update(p.rstrip("/").removeprefix("./") for p in rest.split()[:-1])
    assert copied <= allowed, f"the Dockerfile copies what .dockerignore leaves out: {copied - allowed}"
    assert not allowed & {".git", ".venv", "runs"}


def test_compose_and_prometheus_match_the_image():
    yaml = pytest.importorskip("yaml")
    env = runtime_env()
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    svc = compose["services"]["textgen"]
    assert set(svc.get("environment") or {}) <= KNOWN_ENV
    published = {int(p.split(":")[-1]) for p in svc["ports"]}
    assert published == {int(env["TEXTGEN_PORT"]), int(env["TEXTGEN_METRICS_PORT"]), int(env["TEXTGEN_HTTP_PORT"])}
    grace = float(str(svc["stop_grace_period"]).rstrip("s"))
    assert grace > float(env["TEXTGEN_GRACE_SECONDS"])

    prom_service = compose["services"]["prometheus"]
    config_mount = next(v for v in prom_service["volumes"] if v.endswith("/etc/prometheus/prometheus.yml:ro"))
    prom = yaml.safe_load((ROOT / config_mount.split(":")[0]).read_text())
    targets = [t for job in prom["scrape_configs"] if job["job_name"] == "textgen"
               for sc in job["static_configs"] for t in sc["targets"]]
    assert targets == [f"textgen:{env['TEXTGEN_METRICS_PORT']}"]
