"""Running the ``hybridkv`` command in-process for the bad-input tests, and its contract:
exit 2 with one ``hybridkv: error:`` line, or exit 0 with finite numbers in ``--json``."""

from __future__ import annotations

import contextlib
import io
import json
import math
import signal
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from hybridkv.cli.main import SAFETY_NET, main


@dataclass(frozen=True)
class Outcome:
    """What one run printed and returned."""

    code: int
    out: str
    err: str
    from_argparse: bool


class Hang(Exception):
    """A call that did not return: the old FIFO open, the split loop on 10^30 GiB."""


HANG_S = 60  # a watchdog, not a timing: hypothesis' deadline reports slow calls only once they return


@contextlib.contextmanager
def watchdog(argv: list[str]) -> Iterator[None]:
    if not hasattr(signal, "SIGALRM"):
        yield
        return

    def fire(signum: int, frame: Any) -> None:
        raise Hang(f"hybridkv {argv!r:.300} still running after {HANG_S} s")

    previous = signal.signal(signal.SIGALRM, fire)
    signal.alarm(HANG_S)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def invoke(argv: list[str]) -> Outcome:
    out, err = io.StringIO(), io.StringIO()
    with watchdog(argv), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code, from_argparse = main(argv), False
        except SystemExit as e:  # argparse's own errors
            code, from_argparse = int(e.code or 0), True
    return Outcome(code, out.getvalue(), err.getvalue(), from_argparse)


def _reject_constant(name: str) -> Any:
    raise AssertionError(f"non-finite number {name} in --json output")


def _finite(value: Any) -> None:
    if isinstance(value, float):
        assert math.isfinite(value), value
    elif isinstance(value, dict):
        for v in value.values():
            _finite(v)
    elif isinstance(value, list):
        for v in value:
            _finite(v)


def check(argv: list[str]) -> Outcome:
    """The contract: exit 2 with one 'hybridkv: error:' line (argparse's errors too) and
    nothing on stdout, or exit 0 with nothing on stderr and finite --json numbers."""
    r = invoke(argv)
    assert "Traceback" not in r.err
    assert SAFETY_NET not in r.err, r.err  # the last net caught it: a root cause is left
    assert r.code in (0, 2), r
    if r.code == 2:
        assert r.out == ""
        lines = r.err.splitlines()
        assert r.err.endswith("\n") and lines[-1].startswith("hybridkv: error: "), r.err
        assert sum(line.startswith("hybridkv: error:") for line in lines) == 1
        assert len(lines) == 1, r.err
    else:
        assert r.err == ""
        if "--json" in argv:
            _finite(json.loads(r.out, parse_constant=_reject_constant))
    return r
