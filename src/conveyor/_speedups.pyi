from collections import deque
from typing import TypeVar

T = TypeVar("T")

def take(q: deque[T], n: int, /) -> list[T]:
    """Pop the first ``n`` items of ``q`` (at most ``len(q)``) into a list."""
