"""The classic producer-consumer lesson, done right, twice.

The textbook version puts random numbers into one shared slot guarded by two
locks and ends with an in-band ``FINISH`` sentinel. Here is the same program
with conveyor: first with a Channel (the part that replaces the slot and the
locks), then as a Pipeline (the part that replaces the threads too).
"""

from __future__ import annotations

import random
import threading

import conveyor as cv

COUNT = 20


def produce(rng: random.Random) -> list[int]:
    return [rng.randint(1, 100) for _ in range(COUNT)]


def with_channel(numbers: list[int]) -> list[int]:
    """One producer thread, one consumer thread, one bounded Channel, no sentinel."""
    channel: cv.Channel[int] = cv.Channel(maxsize=4)
    consumed: list[int] = []

    def producer(handle: cv.Producer[int]) -> None:
        with handle:  # closing the handle closes the channel: the consumer's loop ends
            for n in numbers:
                handle.put(n)

    def consumer() -> None:
        consumed.extend(channel)  # drains until closed and empty

    threads = [
        threading.Thread(target=producer, args=(channel.producer(),)),
        threading.Thread(target=consumer),
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return consumed


def with_pipeline(numbers: list[int]) -> list[int]:
    """The whole program as a pipeline: source, a stage, and the results in order."""
    return list(cv.Pipeline(numbers).map(lambda n: n, name="consume"))


def main() -> None:
    numbers = produce(random.Random(7))
    print("produced:          ", numbers)
    by_channel = with_channel(numbers)
    print("consumed (Channel):", by_channel)
    by_pipeline = with_pipeline(numbers)
    print("consumed (Pipeline):", by_pipeline)
    assert by_channel == numbers and by_pipeline == numbers, "an item was lost or duplicated"
    print(f"check: {len(numbers)} produced, {len(by_channel)} consumed, none lost or duplicated")


if __name__ == "__main__":
    main()
