"""Quality of a decoding method on a bundled model, on a fixed seeded held-out set.

    python -m bench.quality --model tiny-task --method llada [decoding options] [--n 40] --json
        (without --gen-length each example gets the smallest canvas of 256/512/1024 that holds its answer;
         vanilla without --block-length decodes in blocks of 32)
    python -m bench.quality --model tiny-text --method fast_dllm_prefix --threshold 0.9 --json

tiny-task: per-task exact match (deterministic tasks) or validity (many-answer tasks), answer lengths.
tiny-text: agreement with vanilla decoding and the masked-diffusion ELBO of each continuation under the model.
Both: generated tokens (non-EOS, after stop-string truncation, as the papers count), forward passes, wall time.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch

from diffuserve.tools.cli import add_decoding_flags, decoding_options
from diffuserve.engine.decoding import DecodeOptions
from diffuserve.engine.decoding.options import carried
from diffuserve.engine.llm import LLM
from diffuserve.tools.evaluate import eval_task

VANILLA = {"llada": "llada", "dream": "dream"}
# vanilla on tiny-task without --block-length: semi-autoregressive blocks of 32, the setting of LLaDA's own example
# and the one the model card reports (one block of up to 1024 positions would be a different decoder)
TASK_VANILLA_BLOCK = 32


def is_task_model(llm: LLM) -> bool:
    """tiny-task (or a checkpoint on its vocabulary): scored by the task checkers, not by text agreement."""
    return llm.tokenizer is not None and "count" in llm.tokenizer.get_vocab()


TEXT_PROMPTS = ["ROMEO.\n", "JULIET.\nO Romeo,", "KING LEAR.\n", "HAMLET.\nTo be", "First Citizen.\n",
                "PORTIA.\nThe quality of mercy", "MACBETH.\nIs this a dagger", "PROSPERO.\n"]


def eval_text(llm: LLM, method: str, opts: DecodeOptions, n: int, seed: int) -> dict:
    from diffuserve.tools.train.objective import elbo

    vanilla = VANILLA[llm.spec.family]
    agree, compared, elbos = 0, 0, []
    totals = {"generated_tokens": 0, "forward_passes": 0, "wall_time_s": 0.0}
    for i in range(n):
        ids = llm.encode(TEXT_PROMPTS[i % len(TEXT_PROMPTS)])
        out = llm.generate(ids, method, opts, seed=seed + i)
        ref = llm.generate(ids, vanilla, carried(opts, llm.method(vanilla).options),
                           seed=seed + i) if method != vanilla else out
        agree += sum(a == b for a, b in zip(out.canvas_ids, ref.canvas_ids))
        compared += len(out.canvas_ids)
        seq = torch.tensor([ids + out.canvas_ids])
        region = torch.zeros_like(seq, dtype=torch.bool)
        region[:, len(ids):] = True
        elbos.append(float(elbo(llm.model, seq, region)[0]))
        totals["generated_tokens"] += len(out.completion.token_ids)
        totals["forward_passes"] += out.forward_calls
        totals["wall_time_s"] += out.wall_time_s
    return {"agreement_with_vanilla": round(agree / max(1, compared), 4),
            "elbo_nats_per_token": round(sum(elbos) / len(elbos), 4), **totals}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.quality", description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="tiny-task, tiny-text, or a model directory")
    p.add_argument("--n", type=int, default=40, help="held-out examples")
    p.add_argument("--json", action="store_true")
    p.add_argument("--dtype", default="auto",
                   help="auto (default): the checkpoint's stored dtype (bf16 for the bundled models); or float32, ...")
    add_decoding_flags(p)
    args = p.parse_args(argv)
    llm = LLM(args.model, args.dtype)
    vanilla = args.method in (None, "vanilla")
    method = VANILLA[llm.spec.family] if vanilla else args.method
    given = decoding_options(args)
    if vanilla and is_task_model(llm) and given.get("block_length") is None:
        given["block_length"] = TASK_VANILLA_BLOCK
    opts = llm.method(method).make_options(given)
    t0 = time.monotonic()
    if is_task_model(llm):
        scores = eval_task(llm, method, opts, args.n, args.seed, fixed_canvas=args.opt_gen_length is not None)
    else:
        scores = eval_text(llm, method, opts, args.n, args.seed)
    report = {"model": args.model, "method": method, "options": {k: v for k, v in opts.__dict__.items()},
              "n": args.n, **scores, "bench_wall_time_s": round(time.monotonic() - t0, 1)}
    print(json.dumps(report, indent=None if args.json else 2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
