"""The README's quick start, run exactly as written (only the port differs) against `diffuserve serve`."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

from conftest import running_server

README = (Path(__file__).parents[1] / "README.md").read_text()


def block(name: str) -> str:
    m = re.search(rf"<!-- {name} -->\n(.*?)<!-- /{name} -->", README, re.S)
    assert m, name
    return m.group(1)


def test_readme_quickstart_works_as_written():
    curl = [c.strip() for c in block("quickstart-curl").replace("\\\n", " ").splitlines() if c.strip()]
    python = block("quickstart-python").split("```python\n", 1)[1].split("```", 1)[0]
    assert len(curl) == 3 and "localhost:8000" in python
    with running_server() as base:  # no model argument: the bundled default, as the README starts it
        here = base.removeprefix("http://")
        for cmd in curl:
            out = subprocess.run(["bash", "-c", cmd.replace("localhost:8000", here)], capture_output=True,
                                 text=True, timeout=120, check=True).stdout
            if '"stream": true' in cmd:
                events = [ln[6:] for ln in out.splitlines() if ln.startswith("data: ")]
                assert events[-1] == "[DONE]" and all("choices" in json.loads(e) for e in events[:-1])
            else:
                body = json.loads(out)
                assert body["choices"] and body["usage"]["completion_tokens"] > 0, body
        run = subprocess.run([sys.executable, "-c", python.replace("localhost:8000", here)], capture_output=True,
                             text=True, timeout=120)
        assert run.returncode == 0, run.stderr
        assert run.stdout.strip()
