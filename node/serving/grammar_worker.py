"""The child process that compiles outlines indexes for node/serving/grammar.py.

Run as a script (`python grammar_worker.py`), so it imports outlines-core and the standard library
only, not the node package (torch): it starts in about 0.1 s. A compile cannot be interrupted from
Python, and some small schemas take minutes (a string with `maxLength: 30` ran past 6 minutes
against a 129k vocabulary here), so the parent kills this process when a compile overruns its time
and starts a fresh one for the next.

Protocol on stdin/stdout, each message a 4-byte big-endian length and a pickle: first the
`Vocabulary`, then any number of regular expressions (str); each is answered with ("ok", Index) or
("error", message).
"""

from __future__ import annotations

import pickle
import struct
import sys
from typing import IO, Any


def read(stream: IO[bytes]) -> Any:
    head = stream.read(4)
    if len(head) < 4:
        return None
    (n,) = struct.unpack(">I", head)
    return pickle.loads(stream.read(n))


def write(stream: IO[bytes], obj: Any) -> None:
    data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    stream.write(struct.pack(">I", len(data)) + data)
    stream.flush()


def main() -> None:
    from outlines_core import Index

    stdin, stdout = sys.stdin.buffer, sys.stdout.buffer
    vocabulary = read(stdin)
    while (regex := read(stdin)) is not None:
        try:
            write(stdout, ("ok", Index(regex, vocabulary)))
        except Exception as exc:
            write(stdout, ("error", f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"))


if __name__ == "__main__":
    main()
