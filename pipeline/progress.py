"""What a pipeline run shows while it goes: the caller decides (the CLI draws rich bars; a
library call is silent unless it passes something)."""

from __future__ import annotations

import contextlib
from typing import Callable, ContextManager, Iterator, Protocol


class Progress(Protocol):
    """`stage` announces a stage and yields a callback that advances it by one of `total` steps;
    `note` reports a line; `bars` says whether training draws its own progress bars."""

    bars: bool

    def stage(self, name: str, total: int | None = None) -> ContextManager[Callable[..., None]]: ...

    def note(self, message: str) -> None: ...


class Silent:
    """Shows nothing: the default of `vitcompact.pipeline.run`."""

    bars = False

    @contextlib.contextmanager
    def stage(self, name: str, total: int | None = None) -> Iterator[Callable[..., None]]:
        yield lambda *_: None

    def note(self, message: str) -> None:
        pass
