"""The playground: GET /playground, a page served by the server itself (no build step, no CDN) that runs a prompt
through one method, or two side by side, and draws each canvas as it settles from the stream's canvas events
(`stream_options.include_canvas`, engine/canvas.py). It is on where /docs is (server.docs) and, like /docs, needs
no key to load; its requests carry the API key typed into it, and get the same errors as any client's.
"""

from __future__ import annotations

import json
import secrets
from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import HTMLResponse

from diffuserve.engine.decoding import METHODS

PAGE = Path(__file__).with_name("playground.html")
EXAMPLES = {"tiny-task": "count down from w3 x1 y2", "tiny-text": "ROMEO.\n"}


def page_config(r, option_fields: tuple[str, ...]) -> dict:
    """What the page needs: the model, and each method it can decode with the knobs the body may set (at their
    configured values; empty where the method's default applies)."""
    family, cfg = r.llm.spec.family, r.cfg.decoding
    default = cfg.default_method(family)
    methods = {}
    for name, m in sorted(METHODS.items()):
        if not m.decodes(family) or name == "score":
            continue
        opts = cfg.options_for(m, default)
        if name == "guided" and getattr(opts, "verifier", None) is None:
            continue  # needs a verifier model the config does not name
        methods[name] = {k: getattr(opts, k) for k in option_fields
                         if k in m.options.field_names() and k != "temperature"}
        methods[name] = {"temperature": opts.temperature, **methods[name]}
    tok = r.llm.tokenizer
    return {"model": r.served, "family": family, "default_method": default, "methods": methods,
            "chat": bool(tok is not None and getattr(tok, "chat_template", None)),
            "max_model_len": r.llm.spec.max_positions, "example": EXAMPLES.get(r.served, "")}


def install(app: FastAPI, r, option_fields: tuple[str, ...]) -> None:
    if not r.cfg.server.docs:
        return
    template = PAGE.read_text()
    config = page_config(r, option_fields)

    @app.get("/playground", include_in_schema=False)
    async def playground():
        nonce = secrets.token_urlsafe(16)
        # JSON inside <script>: "<" escaped, so no string in it can close the tag
        blob = json.dumps(config).replace("<", "\\u003c")
        html = template.replace("__NONCE__", nonce).replace("__CONFIG__", blob)
        csp = (f"default-src 'none'; script-src 'nonce-{nonce}'; style-src 'unsafe-inline'; connect-src 'self'; "
               "img-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
        return HTMLResponse(html, headers={"Content-Security-Policy": csp, "X-Content-Type-Options": "nosniff"})
