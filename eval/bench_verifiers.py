"""Time one `verify` call of every registered verifier.

    python eval/bench_verifiers.py                      # full grid on CPU (and CUDA if present)
    python eval/bench_verifiers.py --batch 1 --vocab 151936 --drafts 4 --json out.json

q and p are softmaxes of correlated random logits (float32); drafts are drawn
under each verifier's draft scheme. Each configuration is timed over several
calls after a warm-up and the median is reported, with the input checks on
(the default) and off (``validate=False``). `single` always takes one draft.
"""

from __future__ import annotations

import argparse
import functools
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from hf_globalres import verifiers


def correlated_case(batch: int, vocab: int, device: torch.device, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(q, p) [B, V] float32 on ``device``: softmax(z + 0.7 ε₁), softmax(z + 0.7 ε₂), z ~ 2·N(0, 1)."""
    g = torch.Generator().manual_seed(seed)
    base = 2 * torch.randn(batch, vocab, generator=g)
    q = torch.softmax(base + 0.7 * torch.randn(batch, vocab, generator=g), -1)
    p = torch.softmax(base + 0.7 * torch.randn(batch, vocab, generator=g), -1)
    return q.to(device), p.to(device)


def time_calls(fn, device: torch.device, repeats: int, budget_s: float) -> list[float]:
    """Seconds per call: one warm-up, then up to ``repeats`` calls within ``budget_s``."""

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    fn()
    sync()
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < repeats and (len(times) < 3 or time.perf_counter() - start < budget_s):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return times


def run(args: argparse.Namespace) -> list[dict]:
    devices = [torch.device(d) for d in args.device]
    names = args.verifiers or verifiers.available()
    rows = []
    for device in devices:
        for vocab in args.vocab:
            for batch in args.batch:
                q, p = correlated_case(batch, vocab, device)
                for n in args.drafts:
                    for name in names:
                        checked = verifiers.get(name)
                        drafts_n = min(n, checked.max_drafts or n)
                        if drafts_n != n and n != args.drafts[0]:
                            continue  # `single` is timed once per (device, V, B)
                        g = torch.Generator(device=device).manual_seed(0)
                        drafts = torch.multinomial(p, drafts_n, replacement=checked.draft_scheme == "iid", generator=g)
                        row = {"device": str(device), "verifier": name, "batch": batch, "vocab": vocab, "n": drafts_n}
                        for label, rule in (
                            ("ms_checked", checked),
                            ("ms_unchecked", verifiers.get(name, validate=False)),
                        ):
                            call = functools.partial(rule.verify, q, p, drafts, generator=g)
                            times = time_calls(call, device, args.repeats, args.budget)
                            row[label] = 1e3 * statistics.median(times)
                            row[label.replace("ms", "calls")] = len(times)
                        rows.append(row)
                        print(
                            f"{row['device']:>6} {name:>28} B={batch:<3} V={vocab:<7} n={drafts_n:<2} "
                            f"{row['ms_checked']:9.3f} ms  {row['ms_unchecked']:9.3f} ms unchecked",
                            flush=True,
                        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    default_devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    parser.add_argument("--device", nargs="+", default=default_devices)
    parser.add_argument("--batch", nargs="+", type=int, default=[1, 8, 64])
    parser.add_argument("--vocab", nargs="+", type=int, default=[32_000, 151_936])
    parser.add_argument("--drafts", nargs="+", type=int, default=[2, 4, 8])
    parser.add_argument("--verifiers", nargs="+", default=None, help="default: every registered verifier")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--budget", type=float, default=2.0, help="seconds of timed calls per configuration")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--json", type=Path, default=Path("eval/results/bench_verifiers.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = run(args)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    meta = {"torch": torch.__version__, "machine": platform.processor() or platform.machine(), "threads": args.threads}
    if torch.cuda.is_available():
        meta["cuda_device"] = torch.cuda.get_device_name()
    args.json.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
