"""Forward costs of the real pair per kind of float32 CPU linear layer: the default BLAS call, oneDNN, and
oneDNN with weights packed for a number of rows (hf_globalres.devices.use_onednn_linear).

    python eval/bench_linears.py                      # target and draft, packed for 1, 8, 32 and 128 rows
    python eval/bench_linears.py --pack-rows 32 --models target

One forward of 1, 5, 17, 33 and 128 (a prompt) new tokens on a 200-token cache, and for the draft one
step of 1 and 4 rows, each after a warm-up; the kinds of layer take turns (``--rounds``, median
reported) on one loaded model, so that they are compared in one machine state. Prints a table and
writes JSON.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
from pathlib import Path

import torch
from device_check import forward_seconds  # eval/, beside this script

from hf_globalres import devices, models

CONTEXT = 200
TOKENS = (1, 5, 17, 33, 128)
DRAFT_ROWS = (1, 4)


def costs(model: torch.nn.Module, draft: bool) -> dict[str, float]:
    """Milliseconds of one forward: ``"tokens=T"`` for one row of T new tokens, ``"rows=R"`` for R rows of one."""
    cpu = torch.device("cpu")
    with torch.no_grad():
        out = {f"tokens={t}": 1e3 * forward_seconds(model, 1, t, cpu, CONTEXT, repeats=1) for t in TOKENS}
        if draft:
            out |= {f"rows={r}": 1e3 * forward_seconds(model, r, 1, cpu, CONTEXT, repeats=1) for r in DRAFT_ROWS}
    return out


def switch(model: torch.nn.Module, kind: str) -> None:
    """Give ``model`` the linear layers named by ``kind``: "default BLAS", "oneDNN" or "oneDNN packed for R rows"."""
    devices.restore_linear(model)
    if kind == "oneDNN":
        devices.use_onednn_linear(model)
    elif kind.startswith("oneDNN packed for "):
        devices.use_onednn_linear(model, pack_rows=int(kind.split()[3]))


def kernels(spec: str, pack_rows: list[int], draft: bool, rounds: int) -> dict[str, dict[str, float]]:
    """Median forward costs of one model under each kind of linear layer, the kinds taking turns ``rounds`` times
    (so that a drift of the machine's speed reaches every kind alike)."""
    model = models.load_model(spec, dtype=torch.float32)
    kinds = ["default BLAS"]
    if devices.onednn_linear_available():
        kinds += ["oneDNN", *(f"oneDNN packed for {rows} rows" for rows in pack_rows)]
    samples: dict[str, list[dict[str, float]]] = {kind: [] for kind in kinds}
    for _ in range(rounds):
        for kind in kinds:
            switch(model, kind)
            samples[kind].append(costs(model, draft))
    return {kind: {key: statistics.median(s[key] for s in runs) for key in runs[0]} for kind, runs in samples.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", default=models.DEFAULT_TARGET)
    parser.add_argument("--draft", default=models.DEFAULT_DRAFT)
    parser.add_argument("--models", default="target,draft", help="which of the pair to time: target,draft")
    parser.add_argument("--pack-rows", default="1,8,32,128", help="rows to pack the weights for, comma-separated")
    parser.add_argument("--rounds", type=int, default=3, help="turns each kind of layer takes (median reported)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path, default=Path("eval/results/bench_linears.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    pack_rows = [int(x) for x in args.pack_rows.split(",") if x]
    report = {"machine": platform.processor() or platform.machine(), "torch": torch.__version__,
              "threads": args.threads, "context": CONTEXT, "rounds": args.rounds, "milliseconds": {}}  # fmt: skip
    for name in args.models.split(","):
        spec = {"target": args.target, "draft": args.draft}[name]
        results = kernels(spec, pack_rows, name == "draft", args.rounds)
        report["milliseconds"][name] = results
        for kind, row in results.items():
            print(f"{name:6s} {kind:28s} " + "  ".join(f"{k} {v:7.1f}" for k, v in row.items()))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=1))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
