"""Running the n choices of a completion on the core, each a Generate stream of its own.

Every event of a choice is handed to the consumer (the response writer) with a future that the consumer
resolves once the event is written; only then does the choice ask its stream for the next event, which is
when the core moves the session past the event's tokens (:meth:`~textgen.service.interface.Core.generate`).
So a response cut by the client's disconnect leaves the session at exactly the text written: an event whose
write was cancelled (it waited for flow control and wrote nothing) is not taken; an event written whose
choice was cancelled before it asked for the next one is taken (``MessageGiven``), as gRPC does.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass, field

from ..errors import MessageGiven
from ..interface import Core, FinishEvent, GenerateParams, TokenEvent

Event = TokenEvent | FinishEvent | BaseException


@dataclass
class ChoiceState:
    """What one choice produced so far (for a non-streamed response, and usage)."""

    index: int
    text: list[str] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    finish: FinishEvent | None = None

    def add(self, ev: TokenEvent) -> None:
        self.text.append(ev.text)
        if ev.logprobs is not None:
            self.logprobs.extend(ev.logprobs)


class Choices:
    """n Generate streams run as tasks; :meth:`events` yields ``(index, event, ack)`` in arrival order, a
    stream's failure as the exception (its ``ack`` None). Call :meth:`close` however the consumer stops."""

    def __init__(self, core: Core, params: list[GenerateParams]):
        self.core = core
        self.states = [ChoiceState(i) for i in range(len(params))]
        self._queue: asyncio.Queue[tuple[int, Event, asyncio.Future[None] | None]] = asyncio.Queue()
        self._tasks = [asyncio.create_task(self._run(i, p)) for i, p in enumerate(params)]
        self._pending: asyncio.Future[None] | None = None

    async def _run(self, index: int, params: GenerateParams) -> None:
        loop = asyncio.get_running_loop()
        try:
            async with aclosing(self.core.generate(params)) as events:
                async for ev in events:
                    written: asyncio.Future[None] = loop.create_future()
                    self._queue.put_nowait((index, ev, written))
                    try:
                        await written
                    except asyncio.CancelledError:
                        if written.done() and not written.cancelled():
                            # written, and the client may have read it: the session takes it too
                            with contextlib.suppress(MessageGiven):
                                await events.athrow(MessageGiven())
                        raise
        except asyncio.CancelledError:
            raise
        except BaseException as exc:  # a refusal (ServiceError) or a bug: the consumer decides
            self._queue.put_nowait((index, exc, None))

    async def events(self) -> AsyncIterator[tuple[int, Event, asyncio.Future[None] | None]]:
        running = len(self._tasks)
        while running:
            index, ev, ack = await self._queue.get()
            if isinstance(ev, BaseException | FinishEvent):
                running -= 1
            if isinstance(ev, FinishEvent):
                self.states[index].finish = ev
            elif isinstance(ev, TokenEvent):
                self.states[index].add(ev)
            self._pending = ack
            yield index, ev, ack

    @staticmethod
    def written(ack: asyncio.Future[None] | None) -> None:
        if ack is not None and not ack.done():
            ack.set_result(None)

    async def close(self) -> None:
        """End every stream: an event handed out and not acknowledged was not written (its tokens are not taken)."""
        if self._pending is not None and not self._pending.done():
            self._pending.cancel()
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await t
