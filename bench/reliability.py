"""Run the reliability suite and write its figures to docs/reliability.md.

    python -m bench.reliability [--soak] [--out docs/reliability.md]

Runs `pytest tests/reliability` (with `--soak`: also the tests marked `soak`), collects every `FIGURE` line the
tests report (RELIABILITY.md B.4), and writes them as a table with the command, the date and the pass count.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# B.4 number and what the done-when list asks of each figure
ROWS = [
    ("validation", "1", "≥40 bad inputs → 0 5xx"),
    ("poisoning", "2", "golden outputs unchanged after bad input"),
    ("schema_fuzz", "3", "schemathesis ≥500 cases → 0 failures"),
    ("body_header_limits", "4", "over the limit → 413 / 431 before parsing"),
    ("amplification", "5", "error bytes / request bytes ≤ 10"),
    ("auth", "6", "exactly the protected routes → 401"),
    ("backpressure", "7", "overload → only 429/503, 0 lost"),
    ("deadlines", "8", "deadline, slow-loris and slow body ended in time"),
    ("disconnect", "9", "200 disconnects → 0 leaked"),
    ("sigterm_drain_300s", "11", "SIGTERM → every in-flight request finished"),
    ("sigterm_drain_0s", "11", "SIGTERM, drain 0 → in-flight aborted, exit 0"),
    ("health_states", "12", "loading, warming, ready, draining, dead"),
    ("fault_injection", "13", "an injected runner fault → only that request fails"),
    ("fatal_fault", "13", "a fatal fault → engine dead, /health 503, watchdog"),
    ("sse", "14", "strict SSE framing"),
    ("metrics_vs_ledger", "18", "metrics equal the ledger"),
    ("cve_regressions", "19", "known attacks → 4xx within 1 s"),
    ("secure_defaults", "20", "loopback bind, no unsafe deserialisers"),
    # issue 33: no request, however shaped, can starve, crash or fool the server
    ("hostile_shapes", "33", "hostile bodies beside streams → no stream waits a step"),
    ("body_slots", "33", "a body of n = all slots → holds half; a later request runs next step"),
    ("cost_bound_llada", "33", "most hostile knobs → ≤ 2 forwards per token (LLaDA family)"),
    ("cost_bound_dream", "33", "most hostile knobs → ≤ 2 forwards per token (Dream family)"),
    ("prompt_bounds", "33", "huge prompts refused unread; no tokenizing on the event loop"),
    ("chat_markers", "33", "special-token text typed in chat → text"),
    ("sigterm_long_llada", "33", "SIGTERM with a 1,024-step llada request → 503, exit 0 in time"),
    ("sigterm_long_window", "33", "SIGTERM with n=4 whole-canvas window requests → 503, exit 0 in time"),
    ("early_disconnect", "33", "clients gone before the first output → aborted, no error logged"),
    ("engine_stall", "33", "no step for stall_timeout_s → /health 503, watchdog exits"),
    ("batch_invariance", "33", "--batch-invariant → batched tokens equal alone, default dtype"),
]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--soak", action="store_true", help="also run the long soak tests (marker `soak`)")
    ap.add_argument("--out", default=str(REPO / "docs" / "reliability.md"))
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        figures_path = Path(tmp) / "figures.json"
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/reliability",
               "-m", "soak or not soak" if args.soak else "not soak"]
        print("running:", " ".join(cmd[2:]), file=sys.stderr, flush=True)
        t0 = time.monotonic()
        proc = subprocess.run(cmd, cwd=REPO, env={**os.environ, "DIFFUSERVE_FIGURES": str(figures_path)},
                              capture_output=True, text=True)
        wall = time.monotonic() - t0
        sys.stderr.write(proc.stdout[-3000:])
        figures = json.loads(figures_path.read_text()) if figures_path.exists() else []
    summary = (re.findall(r"^=*\s*(\d+ (?:passed|failed).*?)\s*=*$", proc.stdout, re.M) or ["(no summary)"])[-1]
    Path(args.out).write_text(render(figures, summary, wall, args.soak, proc.returncode))
    print(f"wrote {args.out}: {len(figures)} figures; {summary}", file=sys.stderr)
    return proc.returncode


def render(figures: list[dict], summary: str, wall: float, soak: bool, rc: int) -> str:
    by_test = {f["test"]: f for f in figures}
    lines = ["# Reliability figures", "",
             "The reliability suite (`tests/reliability/`, RELIABILITY.md B.4) as last run on a 2-core CPU machine, "
             "with the command that produced this page:", "",
             f"    python -m bench.reliability{' --soak' if soak else ''}", "",
             f"- Date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; result: {summary} "
             f"(exit status {rc}); wall time {wall / 60:.1f} min.",
             "- The same tests run in the README's test command; each prints a `FIGURE test=... key=value` line.", "",
             "| B.4 | test | what must hold | figures |", "|---|---|---|---|"]
    for name, num, claim in ROWS:
        f = by_test.get(name)
        shown = " ".join(f"{k}={v}" for k, v in f.items() if k != "test") if f else "**not run**"
        lines.append(f"| {num} | `{name}` | {claim} | {shown} |")
    extra = [f for f in figures if f["test"] not in {n for n, _, _ in ROWS}]
    for f in extra:
        lines.append(f"| | `{f['test']}` | | {' '.join(f'{k}={v}' for k, v in f.items() if k != 'test')} |")
    lines += ["", "Not run on CPU (they need a GPU and a real-size model): B.4 #10 overload-then-cancel at scale, "
              "#15–#17 as GPU repeats. Their CPU counterparts: #9 (disconnects), tests/test_openai_api.py (stream "
              "equals non-stream), tests/test_engine.py (batch invariance), bench.serve (load).", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
