"""The exceptions of the torch-free side (runtime, service, scoring), documented in one place.

    TextgenError                 an error the user can fix; the CLI prints it as one line
    ├── BundleError              a model bundle that cannot be used
    │   ├── BundleFileMissing    model.onnx or manifest.json is absent
    │   ├── ChecksumMismatch     model.onnx does not match the manifest's sha256
    │   ├── ManifestError        manifest unreadable, of another format version, or missing fields
    │   └── GraphMismatch        the ONNX graph's inputs/outputs disagree with the manifest
    ├── InputError               bad user input to a job (scoring rows, CLI arguments)
    │   └── UnsafeOutput         an output path that would overwrite the input (the CLI exits 2)
    ├── ScoringError             the scoring job cannot go on: a worker died, or --resume found another run's output
    ├── ServiceError             a request the gRPC service refuses; .code names its gRPC status
    │   ├── InvalidRequest       INVALID_ARGUMENT: empty text, temperature < 0, top_p outside (0, 1], bad TTL
    │   ├── LimitExceeded        a configured limit (named in the message): INVALID_ARGUMENT for a request
    │   │                        bigger than allowed, RESOURCE_EXHAUSTED for a full server (sessions, streams)
    │   ├── SessionNotFound      NOT_FOUND: unknown, expired, evicted or deleted session id
    │   ├── SessionBusy          FAILED_PRECONDITION: another call holds the session
    │   ├── SessionEmpty         FAILED_PRECONDITION: Generate on a session that has consumed no text yet
    │   ├── StreamStalled        DEADLINE_EXCEEDED: the client took no message for --stream-stall-timeout
    │   ├── SessionConflict      ABORTED: another replica moved the session on while this call held it (its
    │   │                        lease had expired): nothing of this call was saved
    │   ├── StoreUnavailable     UNAVAILABLE: the session store (Redis) cannot be reached; nothing half-written
    │   ├── SessionUnreadable    DATA_LOSS: the session store holds a record this server cannot read
    │   ├── SessionLost          DATA_LOSS: the session's record vanished from the store while a call held it
    │   │                        (FLUSHALL, eviction, a Redis that restarted empty): this call was not saved
    │   └── ShuttingDown         UNAVAILABLE: the server is draining
    └── RpcFailed                the client side: a call to the server failed (.code is the grpc.StatusCode)

The gRPC layer maps ServiceError to status codes at one boundary (service/servicer.py); any other exception
there is a bug and becomes INTERNAL with a logged traceback.
"""


class TextgenError(Exception):
    """Base class of user-facing errors. ``exit_code`` is the command line's exit status for it."""

    exit_code = 1


class BundleError(TextgenError):
    pass


class BundleFileMissing(BundleError):
    pass


class ChecksumMismatch(BundleError):
    pass


class ManifestError(BundleError):
    pass


class GraphMismatch(BundleError):
    pass


class InputError(TextgenError):
    pass


class UnsafeOutput(InputError):
    """An output that is the input, or lies inside an input folder: refused before anything is written."""

    exit_code = 2


class ScoringError(TextgenError):
    pass


class ServiceError(TextgenError):
    """A request the service refuses. ``code`` is the name of a ``grpc.StatusCode`` member."""

    code = "INVALID_ARGUMENT"


class InvalidRequest(ServiceError):
    code = "INVALID_ARGUMENT"


class LimitExceeded(ServiceError):
    """A configured limit. ``exhausted=True`` for a full server (RESOURCE_EXHAUSTED), else INVALID_ARGUMENT."""

    def __init__(self, message: str, *, exhausted: bool = False):
        super().__init__(message)
        self.code = "RESOURCE_EXHAUSTED" if exhausted else "INVALID_ARGUMENT"


class SessionNotFound(ServiceError):
    code = "NOT_FOUND"


class SessionBusy(ServiceError):
    code = "FAILED_PRECONDITION"


class SessionEmpty(ServiceError):
    code = "FAILED_PRECONDITION"


class SessionRewindRefused(ServiceError):
    """``session_tokens`` names a count the session cannot be rewound to."""

    code = "FAILED_PRECONDITION"


class StreamStalled(ServiceError):
    code = "DEADLINE_EXCEEDED"


class SessionConflict(ServiceError):
    code = "ABORTED"


class StoreUnavailable(ServiceError):
    code = "UNAVAILABLE"


class SessionUnreadable(ServiceError):
    code = "DATA_LOSS"


class SessionLost(ServiceError):
    code = "DATA_LOSS"


class MessageGiven(Exception):
    """Thrown into a Generate stream whose call ended while its last message was being written: gRPC was given
    the message, so the client may have read it; the session takes its tokens (never less than was read)."""


class ShuttingDown(ServiceError):
    code = "UNAVAILABLE"


class RpcFailed(TextgenError):
    """A client call failed; ``code`` is the ``grpc.StatusCode`` and ``details`` the server's message."""

    def __init__(self, message: str, code: object = None, details: str = ""):
        super().__init__(message)
        self.code = code
        self.details = details
