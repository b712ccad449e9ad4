"""The seam between the front doors (the gRPC servicer, its admission, the server) and the engine side.

:class:`Core` is what a front door may ask of the service, and the only type it holds: the one-process
:class:`~textgen.service.core.TextgenCore` and a front end's :class:`~textgen.service.procs.remote.RemoteCore`
(which forwards every call to an engine shard) both implement it, and so will any later front door. The
types here are the values that cross it: free of protobuf, of numpy and of any transport, so that the wire
between processes (:mod:`textgen.service.procs.wire`) can carry them as they are.

Errors cross it as :class:`~textgen.service.errors.ServiceError` subclasses, each with its gRPC status name.
"""

from __future__ import annotations

import math
import secrets
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from .errors import LimitExceeded, ShuttingDown
from .sampling import SamplingParams
from .sessions import SessionInfo

if TYPE_CHECKING:
    from .config import ServerConfig

__all__ = ["CallGate", "ChoiceScore", "Constraint", "Core", "FeedResult", "FinishEvent", "FinishReason",
           "GenerateParams", "HealthListener", "ModelFacts", "ScoreResult", "SessionInfo", "TokenEvent", "new_seed"]

ModelFacts = dict[str, object]  # the served bundle's public manifest fields (GetModelInfo)
HealthListener = Callable[[str, bool], None]  # (part of the server, whether it works now)


class FinishReason:
    LENGTH = "length"
    STOP = "stop"
    CANCELLED = "cancelled"
    COMPLETE = "constraint_complete"  # the text completes the request's constraint (docs/api.md)


@dataclass(frozen=True)
class Constraint:
    """A Generate's constraint (docs/api.md, Constrained generation): ``kind`` is ``"regex"`` or
    ``"json_schema"`` (``pattern`` holds the expression or the schema's JSON) or ``"choices"`` (``items``)."""

    kind: str
    pattern: str = ""
    items: tuple[str, ...] = ()


@dataclass(frozen=True)
class ChoiceScore:
    """One choice of a ``choices`` Generate: its log-likelihood after the session, and its share among them."""

    text: str
    logprob: float
    probability: float


@dataclass(frozen=True)
class GenerateParams:
    session_id: str = ""
    prompt: str = ""
    max_tokens: int = 0  # 0 = the server's limit
    sampling: SamplingParams = field(default_factory=SamplingParams)
    stop: tuple[str, ...] = ()
    logprobs: bool = False
    session_tokens: int | None = None  # with a session: rewind it exactly to this count first
    constraint: Constraint | None = None


@dataclass(frozen=True, slots=True)
class TokenEvent:
    """One message of a Generate stream: the tokens computed since the previous one (usually one)."""

    text: str  # one character per token
    token_ids: tuple[int, ...]
    logprobs: tuple[float, ...] | None  # of each drawn token under the model's own distribution (raw logits)


@dataclass(frozen=True)
class FinishEvent:
    reason: str  # a FinishReason
    prompt_tokens: int
    generated_tokens: int
    session_tokens: int
    seed: int
    choices: tuple[ChoiceScore, ...] = ()  # a ``choices`` Generate: every choice's score, most likely first
    cached_tokens: int = 0  # prompt tokens whose state came from the prompt cache (not computed again)


@dataclass(frozen=True)
class FeedResult:
    tokens_consumed: int
    unknown_chars: list[str]
    session_tokens: int
    unknown_count: int = 0
    cached_tokens: int = 0  # of tokens_consumed, those whose state came from the prompt cache


@dataclass(frozen=True)
class ScoreResult:
    nll: float
    predictions: int
    token_count: int
    unknown_chars: list[str]
    unknown_count: int = 0
    cached_tokens: int = 0  # of token_count, those whose state and NLL came from the prompt cache

    @property
    def loss(self) -> float:
        return self.nll / self.predictions if self.predictions else 0.0

    @property
    def perplexity(self) -> float:
        return math.exp(self.loss)

    @property
    def bits_per_char(self) -> float:
        return self.loss / math.log(2)


def new_seed() -> int:
    """A seed for a request that gave none (it is returned with the stream's finish, so it can be replayed)."""
    return secrets.randbits(64)


class Core(Protocol):
    """What the service does, as a front door sees it (every method runs on the server's event loop).

    Lifecycle: ``await start()`` before the first call, ``await close()`` after the last. Upkeep, called by the
    server's sweep (:mod:`textgen.service.upkeep`) about once a second: ``sweep()`` drops expired sessions and
    says whether large texts came and went (memory worth giving back), ``idle()`` whether nothing runs, and
    ``await health()`` how each part behind the core is (a part missing from it is fine). ``on_health`` is
    told at once when a part changes between sweeps (an engine shard that went away).

    ``session_tokens`` (Feed, Generate, an updating Score): the count the client believes the session holds;
    a session that holds more (text of its last Generate the client never read) is first rewound exactly to
    it, and one that cannot be is FAILED_PRECONDITION (:class:`~textgen.service.errors.SessionRewindRefused`).

    Admission (:mod:`textgen.service.admission`): ``enter_call``/``leave_call`` count the CreateSession, Feed
    and Score calls from before their request is read. Shutdown: ``stopping = True`` refuses new work and makes
    running streams finish now with FINISH_REASON_CANCELLED.
    """

    config: ServerConfig
    stopping: bool
    calls: int  # CreateSession, Feed and Score calls admitted and not ended
    streams: int  # Generate streams running
    on_health: HealthListener | None

    async def start(self) -> None: ...
    async def close(self) -> None: ...
    def sweep(self) -> bool: ...
    def idle(self) -> bool: ...
    async def health(self) -> dict[str, bool]: ...

    def enter_call(self) -> None: ...
    def leave_call(self) -> None: ...

    async def create_session(self, prompt: str = "", ttl: float | None = None) -> tuple[SessionInfo, FeedResult]: ...
    async def feed(self, session_id: str, text: str, session_tokens: int | None = None) -> FeedResult: ...
    async def score(self, text: str, session_id: str = "", update_session: bool = False,
                    session_tokens: int | None = None) -> ScoreResult: ...
    async def get_session(self, session_id: str) -> SessionInfo: ...
    async def delete_session(self, session_id: str) -> None: ...
    async def fork_session(self, session_id: str, ttl: float | None = None) -> SessionInfo: ...
    async def export_session(self, session_id: str) -> bytes: ...
    async def import_session(self, blob: bytes, ttl: float | None = None) -> SessionInfo: ...
    def model_info(self) -> ModelFacts: ...

    def generate(self, p: GenerateParams) -> AsyncGenerator[TokenEvent | FinishEvent, None]:
        """The stream's events: :class:`TokenEvent` messages, then one :class:`FinishEvent`. The session moves
        past a message's tokens only once the consumer asks for the next event (the message was handed to the
        client); the consumer closes the generator (``contextlib.aclosing``) however it stops. To end it under
        a write, the consumer throws :class:`~textgen.service.errors.MessageGiven` (the client may have the
        message: the session takes it) or :class:`~textgen.service.errors.StreamStalled` into it."""
        ...


class CallGate:
    """What every core shares for admission: the count of CreateSession, Feed and Score calls
    (``--max-concurrent-calls``) and whether the server still takes work."""

    config: ServerConfig
    stopping: bool
    calls: int = 0

    def _check_open(self) -> None:
        if self.stopping:
            raise ShuttingDown("the server is shutting down")

    def enter_call(self) -> None:
        """Admission of a CreateSession, Feed or Score call, counted from before its request is read (by
        :class:`~textgen.service.admission.AdmissionInterceptor`) until it ends: beyond --max-concurrent-calls
        it is refused at once with RESOURCE_EXHAUSTED, so a flood of large requests is neither read nor queued."""
        if self.calls >= self.config.max_concurrent_calls:
            raise LimitExceeded(f"{self.calls} CreateSession/Feed/Score calls are running, the server's limit "
                                "(--max-concurrent-calls); retry later", exhausted=True)
        self.calls += 1

    def leave_call(self) -> None:
        self.calls -= 1
