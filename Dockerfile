# textgen runtime image: the gRPC service (`textgen serve`) with the packaged default model, Prometheus
# metrics and gRPC health checking. No torch, no compilers, no build tools.
#
#   docker build -t textgen .
#   docker run --rm -p 50051:50051 -p 9090:9090 textgen
#
# README.md (Deploy) covers mounting another bundle, health, metrics and shutdown.

# ---- requirements: the runtime dependencies, read from pyproject.toml ----------------------------------
# Only this list keys the dependency layer of the runtime stage (COPY compares content), so neither a code
# change nor an edit elsewhere in pyproject.toml reinstalls the dependencies.
FROM python:3.11-slim AS requirements
WORKDIR /src
COPY pyproject.toml ./
RUN python -c "import tomllib; \
deps = tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']; \
open('/requirements.txt', 'w').write(''.join(d + '\n' for d in deps))"

# ---- wheel: the project's one wheel (pure Python; the generated protobuf code is committed) -------------
FROM python:3.11-slim AS wheel
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY training/ training/
COPY service/ service/
RUN pip wheel --no-cache-dir --no-deps --wheel-dir /wheels .

# ---- runtime --------------------------------------------------------------------------------------------
FROM python:3.11-slim
LABEL org.opencontainers.image.title="textgen" \
      org.opencontainers.image.description="Character-level recurrent language model served over gRPC" \
      org.opencontainers.image.licenses="Apache-2.0"

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_ROOT_USER_ACTION=ignore

# An unprivileged user with fixed ids (numeric USER below, so orchestrators can check runAsNonRoot).
RUN groupadd --system --gid 10001 textgen \
    && useradd --system --uid 10001 --gid textgen --home-dir /home/textgen --create-home \
       --shell /usr/sbin/nologin textgen

# Dependencies first, in their own virtual environment: this layer changes only when the list does. The
# environment has no pip of its own (the base image's pip installs into it with --python).
COPY --from=requirements /requirements.txt /opt/textgen-requirements.txt
RUN python -m venv --without-pip /opt/textgen \
    && python -m pip --python /opt/textgen/bin/python install --no-cache-dir -r /opt/textgen-requirements.txt

# Then the project itself (code + default bundle), without touching the dependencies.
COPY --from=wheel /wheels/ /tmp/wheels/
RUN python -m pip --python /opt/textgen/bin/python install --no-cache-dir --no-deps /tmp/wheels/*.whl \
    && rm -rf /tmp/wheels \
    && python -m pip --python /opt/textgen/bin/python check

# Configuration: every `textgen serve` flag reads TEXTGEN_<NAME> (docs/api.md). TEXTGEN_MODEL unset = the
# packaged model; mount a bundle and set TEXTGEN_MODEL=/path/to/it to serve another one. The grace period
# stays under `docker stop`'s default 10 s timeout, so a drain finishes before any SIGKILL. ONNX Runtime's
# usage telemetry is off: a server sends no data of its own anywhere and writes nothing to disk.
# HTTP (OpenAI-compatible API, JSON routes, playground; docs/http.md) on 8000, with gRPC's TLS and tokens.
# Security: the image serves plaintext gRPC and HTTP on all interfaces (TEXTGEN_INSECURE=1; outside a container
# `textgen serve` refuses that) and metrics on all interfaces, as `docker run -p` needs. For TLS and tokens
# mount certificates and a tokens file and set TEXTGEN_TLS_CERT, TEXTGEN_TLS_KEY, TEXTGEN_AUTH_TOKENS_FILE,
# and TEXTGEN_TLS_CA for the HEALTHCHECK's `textgen health` (docs/deploy.md, TLS and tokens).
ENV PATH=/opt/textgen/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    ORT_DISABLE_TELEMETRY=1 \
    TEXTGEN_HOST=0.0.0.0 \
    TEXTGEN_INSECURE=1 \
    TEXTGEN_PORT=50051 \
    TEXTGEN_METRICS_HOST=0.0.0.0 \
    TEXTGEN_METRICS_PORT=9090 \
    TEXTGEN_HTTP_PORT=8000 \
    TEXTGEN_LOG_LEVEL=info \
    TEXTGEN_LOG_FORMAT=json \
    TEXTGEN_GRACE_SECONDS=8

USER 10001:10001
WORKDIR /home/textgen
EXPOSE 50051 9090 8000

# gRPC health checking against the local server, on whatever TEXTGEN_PORT the container was given
# (exit 0 only when SERVING, 1 otherwise). Health needs no token; under TLS `textgen health` reads
# TEXTGEN_TLS_CA (and TEXTGEN_TLS_SERVER_NAME, TEXTGEN_CLIENT_CERT/KEY for mutual TLS) from the environment.
HEALTHCHECK --interval=15s --timeout=5s --start-period=20s --retries=3 \
    CMD ["/bin/sh", "-c", "textgen health --address \"127.0.0.1:${TEXTGEN_PORT:-50051}\" --timeout 3 || exit 1"]

# The server is PID 1 (exec form, no shell): it handles SIGTERM itself. NOT_SERVING, refuse new calls,
# let running ones finish for TEXTGEN_GRACE_SECONDS, exit 0.
STOPSIGNAL SIGTERM
ENTRYPOINT ["textgen", "serve"]
CMD []
