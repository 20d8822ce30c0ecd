"""A Flower Grid that passes everything through and counts it: messages, bytes and seconds per message type.

The ServerApp wraps its grid in one for every run, so the run summary says what a run cost on the
wire (`traffic`): `bench/secagg.py` compares plain FedAvg with SecAgg+ from it. Bytes are Flower's
object transport's (every nested record deflated, `records.serialized_size`), counted at the
coordinator: what it pushed to the SuperLink and what it pulled back. Seconds are the wall time of
`send_and_receive` calls (a round's phases); pushes and pulls made directly are counted but not timed.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass

from flwr.app import Message, RecordDict
from flwr.serverapp import Grid
from flwr.supercore.run import Run

from federation.protocol import records


@dataclass
class Tally:
    messages_sent: int = 0
    bytes_sent: int = 0
    replies: int = 0
    bytes_received: int = 0
    seconds: float = 0.0


def _size(msg: Message) -> int:
    return 0 if msg.has_error() else records.serialized_size(msg.content)


class MeteredGrid(Grid):
    """Delegates to `inner`; `tallies` holds one Tally per message type, `on_replies` may filter replies."""

    def __init__(self, inner: Grid) -> None:
        self.inner = inner
        self.tallies: dict[str, Tally] = {}
        self.on_send: Callable[[list[Message]], None] | None = None
        self.on_replies: Callable[[list[Message], list[Message]], list[Message]] | None = None
        """Called with (sent, replies) of each send_and_receive; returns the replies the caller sees."""

    def _tally(self, message_type: str) -> Tally:
        return self.tallies.setdefault(message_type, Tally())

    def set_run(self, run: Run) -> None:
        self.inner.set_run(run)

    @property
    def run(self) -> Run:
        return self.inner.run

    def create_message(
        self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str, ttl: float | None = None
    ) -> Message:
        return self.inner.create_message(content, message_type, dst_node_id, group_id, ttl)

    def get_node_ids(self) -> Iterable[int]:
        return self.inner.get_node_ids()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        messages = list(messages)
        for msg in messages:
            tally = self._tally(msg.metadata.message_type)
            tally.messages_sent += 1
            tally.bytes_sent += _size(msg)
        return self.inner.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        replies = list(self.inner.pull_messages(message_ids))
        for msg in replies:
            tally = self._tally(msg.metadata.message_type)
            tally.replies += 1
            tally.bytes_received += _size(msg)
        return replies

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        sent = list(messages)
        if self.on_send is not None:
            self.on_send(sent)
        start = time.monotonic()
        replies = self._exchange(sent, timeout)
        for kind in {m.metadata.message_type for m in sent}:
            self._tally(kind).seconds += time.monotonic() - start
        return self.on_replies(sent, replies) if self.on_replies is not None else replies

    def _exchange(self, sent: list[Message], timeout: float | None) -> list[Message]:
        """The inner grid's send_and_receive, counting what goes out and what comes back."""
        for msg in sent:
            tally = self._tally(msg.metadata.message_type)
            tally.messages_sent += 1
            tally.bytes_sent += _size(msg)
        replies = list(self.inner.send_and_receive(sent, timeout=timeout))
        for msg in replies:
            tally = self._tally(msg.metadata.message_type)
            tally.replies += 1
            tally.bytes_received += _size(msg)
        return replies

    def summary(self) -> dict[str, dict[str, float | int]]:
        return {kind: asdict(t) for kind, t in sorted(self.tallies.items())}
