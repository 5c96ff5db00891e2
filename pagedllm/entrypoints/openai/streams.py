"""Running several engine requests for one HTTP request: merged output streams, disconnect handling, SSE."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TypeVar

from fastapi import Request
from pydantic import BaseModel

from pagedllm.engine.async_engine import RequestStream
from pagedllm.outputs import RequestOutput

T = TypeVar("T")


async def merge(streams: list[RequestStream]) -> AsyncIterator[tuple[int, RequestOutput]]:
    """Interleave several request streams as (stream index, output); closing this closes (aborts) them all."""
    q: asyncio.Queue = asyncio.Queue()
    done = object()

    async def pump(i: int, stream: RequestStream) -> None:
        try:
            async for out in stream:
                await q.put((i, out))
            await q.put((i, done))
        except Exception as exc:  # surfaces in the consumer
            await q.put((i, exc))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    try:
        remaining = len(tasks)
        while remaining:
            i, item = await q.get()
            if item is done:
                remaining -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield i, item
    finally:
        for t in tasks:
            t.cancel()
        for s in streams:
            s.close()
        await asyncio.gather(*tasks, return_exceptions=True)


async def unless_disconnected(raw: Request, work: Awaitable[T], poll_s: float = 0.25) -> T | None:
    """Await `work`, cancelling it (which aborts its requests) if the client goes away first."""
    task = asyncio.ensure_future(work)
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=poll_s)
            if done:
                return task.result()
            if await raw.is_disconnected():
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
                return None
    finally:
        if not task.done():
            task.cancel()


async def collect(streams: list[RequestStream]) -> list[RequestOutput]:
    finals: list[RequestOutput | None] = [None] * len(streams)
    async for i, out in merge(streams):
        finals[i] = out
    return finals


def sse(chunks: AsyncIterator[BaseModel], on_error: Callable[[Exception], dict]) -> AsyncIterator[str]:
    """Server-sent events: one `data:` line per chunk, an error event if the engine fails, then [DONE]."""

    async def gen() -> AsyncIterator[str]:
        try:
            async for chunk in chunks:
                yield f"data: {chunk.model_dump_json(exclude_unset=False)}\n\n"
        except (ValueError, RuntimeError) as exc:
            yield f"data: {json.dumps(on_error(exc))}\n\n"
        yield "data: [DONE]\n\n"

    return gen()
