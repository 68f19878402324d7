"""Issue 33's batch-invariance finding, at the default dtype (`auto`: bf16 where the CPU computes it natively).

Batched, a temperature-0 request's tokens can differ from the same request alone: attention pads each request's
keys to the longest in its group, and the kernels' reduction order follows the padded shapes (in bf16 that moves
a logit enough to flip a near-tie; float32 moves it ~1e-7). `engine.batch_invariant` runs every request in a
forward of its own, exactly as alone: the tokens must then be identical whatever else runs. The default's own
mismatch count is reported, not asserted (it depends on the hardware's kernels).

The measurement runs in a process of its own (batch_probe.py): this suite pins torch's kernels to AVX2
(tests/conftest.py), under which `auto` resolves to float32, not the dtype a served process uses.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from .ledger import figure


def test_batch_invariant_mode_gives_every_request_its_alone_tokens_at_the_default_dtype():
    env = {k: v for k, v in os.environ.items() if k != "ATEN_CPU_CAPABILITY"}
    proc = subprocess.run([sys.executable, str(Path(__file__).with_name("batch_probe.py"))], env=env,
                          capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    figure("batch_invariance", **got)
    assert got["invariant_mode_mismatches"] == 0
