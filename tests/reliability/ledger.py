"""The ledger every load-style reliability test keeps (RELIABILITY.md B.4), and the FIGURE lines tests report.

    sent = ok + rejected + client_aborted + expected_fail + unexpected_fail + lost,   unexpected_fail = lost = 0

`Ledger.record` classifies one outcome; `figure()` prints `FIGURE test=NAME key=value ...` and keeps the values so
the session's summary (conftest) and `python -m bench.reliability` can quote them.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

FIGURES: list[dict] = []  # every figure() call of this session, in order


def rss_mb() -> float:
    """This process's resident memory (VmRSS), in MB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def figure(test: str, **values) -> str:
    line = "FIGURE test=" + test + "".join(f" {k}={v}" for k, v in values.items())
    print(line, flush=True)
    FIGURES.append({"test": test, **values})
    return line


@dataclass
class Ledger:
    """Counts of a load test's requests. `record` takes an HTTP status (or None for "the client gave up")."""

    expected_statuses: frozenset = frozenset()  # 4xx the test means to cause
    sent: int = 0
    ok: int = 0
    rejected: int = 0
    client_aborted: int = 0
    expected_fail: int = 0
    unexpected_fail: int = 0
    unexpected: list = field(default_factory=list)  # (status, detail) of each unexpected failure
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def send(self) -> None:
        with self._lock:
            self.sent += 1

    def record(self, status: int | None, retry_after: str | None = None, detail: str = "") -> None:
        with self._lock:
            if status is None:
                self.client_aborted += 1
            elif status == 200:
                self.ok += 1
            elif status in (429, 503) and retry_after:
                self.rejected += 1
            elif status in self.expected_statuses:
                self.expected_fail += 1
            else:
                self.unexpected_fail += 1
                self.unexpected.append((status, detail[:200]))

    @property
    def lost(self) -> int:
        return self.sent - (self.ok + self.rejected + self.client_aborted + self.expected_fail
                            + self.unexpected_fail)

    def counts(self) -> dict:
        return {"sent": self.sent, "ok": self.ok, "rejected": self.rejected, "client_aborted": self.client_aborted,
                "expected_fail": self.expected_fail, "unexpected_fail": self.unexpected_fail, "lost": self.lost}

    def check(self) -> None:
        """The ledger's invariant: nothing failed unexpectedly and nothing was lost."""
        assert self.unexpected_fail == 0, self.unexpected
        assert self.lost == 0, self.counts()
