"""Translating a runtime's own exceptions into SandboxError, once, at the driver edge."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import TypeVar

from sandfleet.common.errors import SandboxError

E = TypeVar("E", bound=Exception)


def error_translator(
    runtime: str, backend_error: type[E], describe: Callable[[E], str]
) -> Callable[[str, str], AbstractAsyncContextManager[None]]:
    """`async with translated("start", name):` turns `backend_error` into SandboxError."""

    @asynccontextmanager
    async def translated(action: str, subject: str) -> AsyncIterator[None]:
        try:
            yield
        except backend_error as exc:
            raise SandboxError(f"{runtime} {action} {subject}: {describe(exc)}") from exc

    return translated
