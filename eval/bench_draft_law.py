"""What the draft side costs and buys: draft-law truncation and draft numerics on real rows.

    python eval/bench_draft_law.py                       # 6 GSM8K answers, every variant
    python eval/bench_draft_law.py --answers 2 --top-k 16,64
    python eval/bench_draft_law.py --variants float32,vocab32768,int8,int8+vocab32768 --top-k 64,0

The draft law is ours to choose (every verifier is exact for the p it is
handed), so the draft may be truncated to its top-k tokens
(``assistant_top_k``), run in cheaper numerics (int8 weights,
:func:`hf_globalres.devices.quantize_int8`) or score part of the vocabulary
(``vocabN``: the first N ids of its shipped ranking and the question's tokens,
:mod:`hf_globalres.draft_vocab`; variants combine with ``+``, e.g.
``int8+vocab32768``). On teacher-forced positions of
GSM8K reference answers (the built-in pair, T = 1; q from the target in
float32 at every position) this prints, for every draft variant and k:

- the optimal acceptance α*(q, p_k, n) at n = 1 and n = 4, averaged over the
  same positions, and its difference from the float32 draft's full law;
- the median milliseconds of one ``optimal.verify`` call (B = 1, n = 4 drafts
  drawn from p_k) over a sample of positions;
- one draft step per variant (batch 1, 200-token cache).

Writes JSON (default ``eval/reports/bench/bench_draft_law.json``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_generate import DEFAULT_DATA, forward_costs, write_report

from hf_globalres import devices, draft_vocab, models, rates, verifiers
from hf_globalres.generation.processors import truncated_softmax


def teacher_forced_rows(path: Path, count: int, tokenizer) -> list[tuple[torch.Tensor, int]]:
    """(ids [1, T], first answer position) for the first ``count`` GSM8K questions with their reference answers."""
    rows = [json.loads(line) for line in path.read_text().splitlines()[:count]]
    out = []
    for row in rows:
        prompt = tokenizer.apply_chat_template(
            [{"role": "user", "content": row["question"]}], add_generation_prompt=True, tokenize=False
        )
        prompt_ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
        answer_ids = tokenizer(row["answer"], add_special_tokens=False, return_tensors="pt")["input_ids"]
        out.append((torch.cat([prompt_ids, answer_ids], dim=1), prompt_ids.shape[1]))
    return out


@torch.no_grad()
def logits_at_answers(model: torch.nn.Module, rows: list[tuple[torch.Tensor, int]]) -> torch.Tensor:
    """[N, V] float32 next-token logits at every answer position of every row (a restricted draft also
    scores the row's prompt tokens, as in generate)."""
    out = []
    for ids, start in rows:
        with draft_vocab.prompt_vocabulary(model, ids[:, :start]):
            out.append(model(ids).logits[0, start - 1 : -1].float())
    return torch.cat(out)


def load_variant(name: str, variant: str) -> torch.nn.Module:
    """The draft ``name`` as ``variant`` says: "+"-joined parts among float32, bfloat16, int8 and vocabN."""
    parts = variant.split("+")
    unknown = [x for x in parts if x not in ("float32", "bfloat16", "int8") and not x.removeprefix("vocab").isdigit()]
    if unknown:
        raise SystemExit(f"unknown draft variant part(s) {unknown}: use float32, bfloat16, int8, vocabN")
    draft = models.load_model(name, dtype=torch.bfloat16 if "bfloat16" in parts else torch.float32)
    for part in parts:
        if part.startswith("vocab"):
            draft_vocab.restrict_vocabulary(draft, draft_vocab.load_ranking(name), int(part.removeprefix("vocab")))
    if "int8" in parts:
        devices.quantize_int8(draft)
    return draft


def verify_ms(q: torch.Tensor, p: torch.Tensor, positions: int, generator: torch.Generator) -> float:
    """Median ms of one ``optimal.verify`` call at B = 1 over ``positions`` rows, n = 4 drafts from p."""
    rule = verifiers.get("optimal")
    step = max(1, q.shape[0] // positions)
    samples = []
    for i in range(0, q.shape[0], step)[:positions]:
        drafts = torch.multinomial(p[i : i + 1], 4, replacement=True, generator=generator)
        start = time.perf_counter()
        rule.verify(q[i : i + 1], p[i : i + 1], drafts, generator)
        samples.append((time.perf_counter() - start) * 1e3)
    return statistics.median(samples)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", default=models.DEFAULT_TARGET)
    parser.add_argument("--draft", default=models.DEFAULT_DRAFT)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--answers", type=int, default=6)
    parser.add_argument("--top-k", default="16,32,64,128,256,1024,0", help="0: the whole draft law")
    parser.add_argument("--variants", default="float32,int8,bfloat16")
    parser.add_argument("--timed-positions", type=int, default=48)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path, default=Path("eval/reports/bench/bench_draft_law.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    generator = torch.Generator().manual_seed(0)

    tokenizer = models.load_tokenizer(args.target)
    rows = teacher_forced_rows(args.data, args.answers, tokenizer)
    target = models.load_model(args.target, dtype=torch.float32)
    q = torch.softmax(logits_at_answers(target, rows), -1, dtype=torch.float64)
    del target
    print(f"{q.shape[0]} teacher-forced positions of {len(rows)} GSM8K answers, V = {q.shape[1]}, T = 1")
    top_ks = [int(k) for k in args.top_k.split(",")]
    results = []
    for variant in args.variants.split(","):
        draft = load_variant(args.draft, variant)
        scores = logits_at_answers(draft, rows)[:, : q.shape[1]]
        step = forward_costs(draft, draft, torch.device("cpu"))["draft_step_s"]["1"]
        del draft
        full = torch.softmax(scores, -1, torch.float64)
        for k in top_ks:
            p = truncated_softmax(scores, k).probs if 0 < k < scores.shape[1] else full
            row = {
                "draft": variant,
                "top_k": k or "V",
                "alpha_n1": float(rates.optimal_acceptance(q, p, 1).mean()),
                "alpha_n4": float(rates.optimal_acceptance(q, p, 4).mean()),
                "mass_outside_top_k": float(1 - (full * (p > 0)).sum(-1).mean()),
                "verify_ms_n4": verify_ms(q, p, args.timed_positions, generator),
                "draft_step_s": step,
            }
            results.append(row)
            print(
                f"{variant:<9} top-k {row['top_k']!s:>6}: α* n=1 {row['alpha_n1']:.4f}  n=4 {row['alpha_n4']:.4f}  "
                f"verify {row['verify_ms_n4']:6.1f} ms  draft step {step * 1e3:.0f} ms",
                flush=True,
            )
    reference_row = next((r for r in results if r["draft"] == "float32" and r["top_k"] == "V"), None)
    if reference_row is not None:
        for r in results:
            r["alpha_n4_change"] = r["alpha_n4"] - reference_row["alpha_n4"]
            r["alpha_n1_change"] = r["alpha_n1"] - reference_row["alpha_n1"]
    write_report(args.json, {"positions": q.shape[0], "args": {k: str(v) for k, v in vars(args).items()},
                             "results": results})  # fmt: skip


if __name__ == "__main__":
    main()
