"""Acceptance and speed of `optimal` next to every registered verifier and the optimum.

    python eval/bench_optimal.py                                  # full grid (CPU, and CUDA if present)
    python eval/bench_optimal.py --vocab 151936 --drafts 4 --topk 100 --batch 1

q and p are softmaxes of correlated random logits (float32, as in
bench_verifiers.py); p keeps its top-k tokens (k = 0 or k ≥ V: full support)
and is renormalised, q keeps full support. For each (V, n, top-k):

- `optimal`: its exact acceptance Σā per row against ``rates.optimal_acceptance``
  α*, the relative gap (α* − Σā)/α*, the share of rows with gap ≤ 1e-4, and
  failures (exceptions; `optimal` has no fallback).
- every registered verifier: acceptance P(Y ∈ drafts), estimated from
  ``--tuples`` draft tuples spread over the rows (mean ± standard error over
  rows of the exact conditional probability), next to the mean α* of its
  draft scheme.
- milliseconds per verified token: median `verify` time at B = 1, and per
  row at B = 64 (skipped for top-k = V on CPU).

Also times `reference.transport_lp` at the sizes it can do. Timings on a
shared CPU are noisy: medians are reported, with the device and thread count.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_verifiers import correlated_case, time_calls

from hf_globalres import rates, reference, verifiers
from hf_globalres.verifiers.optimal import Optimal

GAP_FLOOR = 1e-4


def truncate_top_k(draft_probs: torch.Tensor, top_k: int) -> torch.Tensor:
    """p [B, V] restricted to its ``top_k`` largest entries and renormalised (top_k ≥ V: unchanged)."""
    if top_k <= 0 or top_k >= draft_probs.shape[1]:
        return draft_probs
    values, index = draft_probs.topk(top_k, dim=-1)
    return torch.zeros_like(draft_probs).scatter(1, index, values / values.sum(-1, keepdim=True))


def draw(draft_probs: torch.Tensor, n: int, scheme: str, generator: torch.Generator) -> torch.Tensor:
    """[B, n] drafts from p under ``scheme`` (−1 where the support is too small to draw without replacement)."""
    if scheme == "iid":
        return torch.multinomial(draft_probs, n, replacement=True, generator=generator)
    support = int((draft_probs > 0).sum(-1).min())
    drawn = torch.multinomial(draft_probs, min(n, support), replacement=False, generator=generator)
    pad = torch.full((draft_probs.shape[0], n - drawn.shape[1]), -1, dtype=torch.long, device=drawn.device)
    return torch.cat([drawn, pad], dim=1)


def scheme_optimum(target_probs: torch.Tensor, draft_probs: torch.Tensor, n: int, scheme: str) -> torch.Tensor:
    """[B] α* for ``scheme``; without replacement on supp p plus one column for q outside it."""
    if scheme == "iid":
        return rates.optimal_acceptance(target_probs, draft_probs, n)
    width = int((draft_probs > 0).sum(-1).max())
    p_s, index = draft_probs.double().topk(width, dim=-1)
    q_s = target_probs.double().gather(1, index)
    outside = (1 - q_s.sum(-1, keepdim=True)).clamp_min(0)
    return rates.optimal_acceptance(
        torch.cat([q_s, outside], -1), torch.cat([p_s, torch.zeros_like(outside)], -1), n, scheme
    )


def acceptance_estimate(
    rule, q: torch.Tensor, p: torch.Tensor, n: int, tuples: int, generator: torch.Generator, chunk: int = 64
) -> tuple[float, float]:
    """Mean over rows, and its standard error, of ``P(Y ∈ drafts)``: ``tuples`` draft tuples per row.

    Each tuple contributes the exact conditional probability that the output is
    one of its drafts; rows are evaluated ``chunk`` tuples at a time.
    """
    rows = q.shape[0]
    hits = []
    for start in range(0, rows * tuples, chunk):
        which = torch.arange(start, min(start + chunk, rows * tuples), device=q.device) // tuples
        q_rows, p_rows = q[which], p[which]
        drafts = draw(p_rows, n, rule.draft_scheme, generator)
        law = rule.conditional(q_rows, p_rows, drafts)
        is_draft = torch.zeros_like(law, dtype=torch.bool).scatter_(1, drafts.clamp_min(0), True)
        # −1 columns clamp to token 0: keep it only where a real draft is 0.
        is_draft[:, 0] = (drafts == 0).any(-1)
        hits.append(torch.where(is_draft, law, 0).sum(-1).double())
    per_row = torch.cat(hits).reshape(rows, tuples).mean(-1)
    stderr = float(per_row.std() / math.sqrt(rows)) if rows > 1 else float("nan")
    return float(per_row.mean()), stderr


def optimal_gaps(q: torch.Tensor, p: torch.Tensor, n: int, chunk: int) -> dict:
    """Exact acceptance of `optimal` row by row (in chunks) against α*."""
    rule = Optimal()
    accepted, best, failures = [], [], 0
    for start in range(0, q.shape[0], chunk):
        rows = slice(start, start + chunk)
        try:
            a, b = rule.acceptance(q[rows], p[rows], n)
        except Exception as error:  # a failure is a result to report, not a crash of the bench
            print(f"    optimal failed: {error!r}", flush=True)
            failures += q[rows].shape[0]
            continue
        accepted.append(a.cpu())
        best.append(b.cpu())
    if not accepted:
        return {"rows": 0, "failures": failures}
    accepted, best = torch.cat(accepted), torch.cat(best)
    gap = ((best - accepted) / best.clamp_min(1e-300)).clamp_min(0)
    return {
        "rows": len(gap),
        "acceptance": float(accepted.mean()),
        "optimum": float(best.mean()),
        "gap_max": float(gap.max()),
        "gap_median": float(gap.median()),
        "within_floor": float((gap <= GAP_FLOOR).double().mean()),
        "failures": failures,
    }


def median_ms(fn, device: torch.device, repeats: int, budget_s: float) -> tuple[float, int]:
    times = time_calls(fn, device, repeats, budget_s)
    return 1e3 * statistics.median(times), len(times)


def run(args: argparse.Namespace) -> dict:
    names = args.verifiers or verifiers.available()
    rows = []
    for device in (torch.device(d) for d in args.device):
        for vocab in args.vocab:
            base_q, base_p = correlated_case(args.rows, vocab, device, seed=args.seed)
            for top_k in args.topk:
                full = top_k <= 0 or top_k >= vocab
                q = base_q
                p = truncate_top_k(base_p, top_k)
                n_rows = min(args.rows, args.full_rows) if full else args.rows
                q, p = q[:n_rows].contiguous(), p[:n_rows].contiguous()
                for n in args.drafts:
                    label = f"{device.type} V={vocab} top-k={'V' if full else top_k} n={n}"
                    entry: dict = {"device": str(device), "vocab": vocab, "top_k": vocab if full else top_k, "n": n}
                    entry["optimal"] = optimal_gaps(q, p, n, chunk=1 if full else 64)
                    g = torch.Generator(device=device).manual_seed(args.seed)
                    entry["verifiers"] = {}
                    for name in names:
                        rule = verifiers.get(name, validate=False)
                        drafts_n = min(n, rule.max_drafts or n)
                        drafts = draw(p, drafts_n, rule.draft_scheme, g)
                        result: dict = {"n": drafts_n, "scheme": rule.draft_scheme}
                        try:
                            t0 = time.perf_counter()
                            tuples = max(1, args.tuples // n_rows)
                            mean, stderr = acceptance_estimate(rule, q, p, drafts_n, tuples, g)
                            result.update(acceptance=mean, stderr=stderr)
                            result["optimum"] = float(scheme_optimum(q, p, drafts_n, rule.draft_scheme).mean())
                            slow = (time.perf_counter() - t0) / tuples > args.budget * 4
                            one = (q[:1], p[:1], drafts[:1])
                            result["ms_b1"], result["calls_b1"] = median_ms(
                                lambda one=one, rule=rule, g=g: rule.verify(*one, generator=g),
                                device,
                                args.repeats,
                                args.budget,
                            )
                            if (not full or device.type == "cuda") and not slow and 64 in args.batch:
                                reps = -(-64 // n_rows)
                                batch = [t.repeat(reps, 1)[:64] for t in (q, p, drafts)]
                                ms, calls = median_ms(
                                    lambda batch=batch, rule=rule, g=g: rule.verify(*batch, generator=g),
                                    device,
                                    args.repeats,
                                    args.budget,
                                )
                                result["ms_per_row_b64"], result["calls_b64"] = ms / 64, calls
                        except Exception as error:  # report, keep benchmarking the others
                            result["error"] = repr(error)
                        entry["verifiers"][name] = result
                    rows.append(entry)
                    print_entry(label, entry)
    return {"rows": rows, "lp": lp_times(args) if args.lp else []}


def print_entry(label: str, entry: dict) -> None:
    o = entry["optimal"]
    if o.get("rows"):
        print(
            f"{label}: optimal Σā {o['acceptance']:.6f} vs α* {o['optimum']:.6f}, gap max {o['gap_max']:.1e} "
            f"(≤1e-4 in {100 * o['within_floor']:.1f}% of {o['rows']} rows), failures {o['failures']}",
            flush=True,
        )
    else:
        print(f"{label}: optimal failed on every row", flush=True)
    for name, r in entry["verifiers"].items():
        if "error" in r:
            print(f"    {name:>28}: error {r['error']}", flush=True)
            continue
        b64 = f"{r['ms_per_row_b64']:9.3f}" if "ms_per_row_b64" in r else "        -"
        print(
            f"    {name:>28} n={r['n']} acc {r['acceptance']:.4f}±{r['stderr']:.4f} (α* {r['optimum']:.4f})  "
            f"B=1 {r['ms_b1']:9.3f} ms   B=64 {b64} ms/row",
            flush=True,
        )


def lp_times(args: argparse.Namespace) -> list[dict]:
    out = []
    for vocab, n in ((4, 2), (6, 2), (10, 2), (4, 3), (6, 3), (10, 3), (4, 4), (6, 4)):
        q, p = correlated_case(1, vocab, torch.device("cpu"), seed=args.seed)
        q, p = q[0].double(), p[0].double()
        t0 = time.perf_counter()
        value = reference.transport_lp(q, p, n)
        seconds = time.perf_counter() - t0
        t0 = time.perf_counter()
        accepted, _ = Optimal().acceptance(q[None], p[None], n)
        optimal_seconds = time.perf_counter() - t0
        out.append({"vocab": vocab, "n": n, "lp_ms": 1e3 * seconds, "lp": value, "optimal_ms": 1e3 * optimal_seconds})
        print(
            f"LP V={vocab} n={n}: {1e3 * seconds:8.1f} ms (value {value:.8f}); optimal {1e3 * optimal_seconds:6.1f} ms "
            f"(Σā {float(accepted[0]):.8f})",
            flush=True,
        )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", nargs="+", default=["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
    parser.add_argument("--vocab", nargs="+", type=int, default=[32_000, 151_936])
    parser.add_argument("--drafts", nargs="+", type=int, default=[2, 4, 8])
    parser.add_argument("--topk", nargs="+", type=int, default=[10, 100, 1000, 0], help="0: full support")
    parser.add_argument("--batch", nargs="+", type=int, default=[1, 64], help="1 and/or 64")
    parser.add_argument("--rows", type=int, default=64, help="random (q, p) rows per configuration")
    parser.add_argument("--full-rows", type=int, default=2, help="rows at full support (top-k = V)")
    parser.add_argument("--tuples", type=int, default=256, help="draft tuples per configuration, spread over the rows")
    parser.add_argument("--verifiers", nargs="+", default=None, help="default: every registered verifier")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--budget", type=float, default=2.0, help="seconds of timed calls per configuration")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: the CPU may be shared)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-lp", dest="lp", action="store_false", help="skip the transport-LP timings")
    parser.add_argument("--json", type=Path, default=Path("eval/results/bench_optimal.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    results = run(args)
    meta = {
        "torch": torch.__version__,
        "machine": platform.processor() or platform.machine(),
        "threads": args.threads,
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
    }
    if torch.cuda.is_available():
        meta["cuda_device"] = torch.cuda.get_device_name()
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"meta": meta, **results}, indent=2))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
