"""End-to-end generation benchmark: plain sampling, transformers' assisted generation, multi-draft decoding.

    python eval/bench_generate.py                                   # full grid (hours on a 2-core CPU)
    python eval/bench_generate.py --prompts 2 --max-new-tokens 32 --drafts 1,4 --lengths 2,4 --verifiers spectr
    python eval/bench_generate.py --drafts 1,4 --lengths 12 --confidence 0.4 --shapes tree,spine --tree on

Real pair (default: the built-in Qwen2.5-Coder-1.5B/0.5B-Instruct, fp32 on CPU),
GSM8K prompts, temperature 1. For every method it reports tokens/s, block
efficiency (new tokens per target forward, counted with a forward hook), the
package's own time per block (everything but model forwards: drafting
bookkeeping, masks, verifier, cache surgery) as a share of the block, and the
peak resident memory of the method (VmHWM, reset before each call; the
process holds every model of the grid). It also times one target forward over
1, 5, 17 and 33 new tokens on a 200-token cache
and one draft step of 1 and 4 tokens, and prints the speedups those costs imply
at the measured block efficiencies (the cost model of eval/device_check.py,
which projects the same JSON onto a GPU's costs with random-weight models of
real sizes). Prints a table and writes JSON.

Methods take turns on each prompt (every method on prompt 1, then on prompt 2,
…), so that a drift of the machine's speed during the run reaches all of them
alike; compare methods within one run.
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from device_check import forward_seconds, project_method  # eval/, beside this script
from transformers import AutoModelForCausalLM, AutoTokenizer

import hf_globalres
from hf_globalres import devices, draft_vocab, models, verifiers

DEFAULT_DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "gsm8k" / "test.jsonl"


def load_pair(target: str, draft: str, dtype: torch.dtype):
    """Models and tokenizer from built-in names (via hf_globalres.models), directories or Hub ids."""
    try:
        return (
            models.load_model(target, dtype=dtype).eval(),
            models.load_model(draft, dtype=dtype).eval(),
            models.load_tokenizer(target),
        )
    except ImportError:
        return (
            AutoModelForCausalLM.from_pretrained(target, dtype=dtype).eval(),
            AutoModelForCausalLM.from_pretrained(draft, dtype=dtype).eval(),
            AutoTokenizer.from_pretrained(target),
        )


def gsm8k_prompts(path: Path, count: int, tokenizer) -> list[torch.Tensor]:
    rows = [json.loads(line) for line in path.read_text().splitlines()[:count]]
    return [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": row["question"]}], add_generation_prompt=True, return_tensors="pt",
            return_dict=True,
        )["input_ids"]
        for row in rows
    ]  # fmt: skip


def write_report(path: Path, report: dict) -> None:
    """Write a benchmark's JSON report, with the machine it ran on, and say where."""
    report = {"machine": machine(), **report}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=1))
    print("wrote", path)


def machine(**extra) -> dict:
    return {"platform": platform.platform(), "threads": torch.get_num_threads(), "torch": torch.__version__, **extra}


class ForwardCounter:
    """Counts forward calls of a module."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.calls = 0
        self.handle = module.register_forward_pre_hook(self._hook)

    def _hook(self, *_):
        self.calls += 1


def reset_peak_memory() -> None:
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


def peak_memory_gb() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 2**20
    return float("nan")


@dataclass
class Method:
    """One row of the benchmark: ``generate(ids)`` of a method, the draft it runs (if any) and fields for its record."""

    name: str
    generate: Callable[[torch.Tensor], object]
    draft: torch.nn.Module | None = None
    fields: dict = field(default_factory=dict)


@dataclass
class Tally:
    """What one method's calls add up to: tokens, seconds, forwards, phase times and peak memory."""

    tokens: int = 0
    seconds: float = 0.0
    target_forwards: int = 0
    draft_forwards: int = 0
    peak_memory_gb: float = 0.0
    phases: dict[str, float] = field(default_factory=dict)

    def record(self, method: Method) -> dict:
        result = {
            "method": method.name,
            "tokens": self.tokens,
            "seconds": self.seconds,
            "tokens_per_s": self.tokens / self.seconds,
            "target_forwards": self.target_forwards,
            "block_efficiency": self.tokens / max(self.target_forwards, 1),
            "draft_forwards": self.draft_forwards,
            "peak_memory_gb": self.peak_memory_gb,
            **method.fields,
        }
        if self.phases:
            total = self.phases["total"]
            result["overhead_share"] = (total - self.phases["target_forward"] - self.phases["draft_forward"]) / total
            result["phase_seconds"] = self.phases
            shares = {k: v / total for k, v in self.phases.items() if k != "total"}
            shares["other"] = 1 - sum(shares.values())
            result["phase_shares"] = shares
        return result


def run_methods(methods: list[Method], prompts: list[torch.Tensor], target, seed: int) -> list[dict]:
    """Every method on every prompt, prompt after prompt (methods in turn on each), one record per method.

    A drift of the machine's speed during the run then reaches every method alike, where running one
    method over all prompts before the next would hand the drift to whichever ran in the slow stretch.
    Each call starts from ``seed + prompt index``; peak memory is the largest of a method's calls.
    """
    tallies = [Tally() for _ in methods]
    counters = {id(module): ForwardCounter(module) for module in [target, *(m.draft for m in methods if m.draft)]}
    try:
        for i, ids in enumerate(prompts):
            for method, tally in zip(methods, tallies, strict=True):
                counted = [counters[id(target)], *([counters[id(method.draft)]] if method.draft else [])]
                before = [counter.calls for counter in counted]
                reset_peak_memory()
                torch.manual_seed(seed + i)
                start = time.perf_counter()
                out = method.generate(ids)
                tally.seconds += time.perf_counter() - start
                tally.peak_memory_gb = max(tally.peak_memory_gb, peak_memory_gb())
                sequences = out.sequences if hasattr(out, "sequences") else out
                tally.tokens += sequences.shape[1] - ids.shape[1]
                calls = [counter.calls - old for counter, old in zip(counted, before, strict=True)]
                tally.target_forwards += calls[0]
                tally.draft_forwards += calls[1] if method.draft else 0
                for phase, value in (getattr(out, "timings", None) or {}).items():
                    tally.phases[phase] = tally.phases.get(phase, 0.0) + value
            print(f"prompt {i + 1}/{len(prompts)} done", flush=True)
    finally:
        for counter in counters.values():
            counter.handle.remove()
    results = [tally.record(method) for method, tally in zip(methods, tallies, strict=True)]
    for r in results:
        print(
            f"{r['method']:<60} {r['tokens_per_s']:7.2f} tok/s  eff {r['block_efficiency']:5.2f}  "
            f"overhead {r.get('overhead_share', float('nan')):6.1%}  peak {r['peak_memory_gb']:.2f} GB"
        )
        if "phase_shares" in r:
            ranked = sorted(r["phase_shares"].items(), key=lambda kv: -kv[1])
            print("    " + "  ".join(f"{k} {v:.1%}" for k, v in ranked))
    return results


def assisted_method(setting: str, target, draft, sample: dict) -> Method:
    """transformers' assisted generation with the draft's generation config set to ``setting`` for each call.

    ``default``: as the draft comes (transformers' defaults: L = 20, confidence threshold 0.4, constant
    schedule); ``heuristic``: its adaptive L schedule without a threshold; an integer: that static L
    without a threshold.
    """
    keys = ("num_assistant_tokens", "num_assistant_tokens_schedule", "assistant_confidence_threshold")
    config = draft.generation_config
    used = {key: getattr(config, key, None) for key in keys}
    if setting == "heuristic":
        used.update(num_assistant_tokens_schedule="heuristic", assistant_confidence_threshold=0.0)
    elif setting != "default":
        used.update(num_assistant_tokens=int(setting), assistant_confidence_threshold=0.0)
        used["num_assistant_tokens_schedule"] = "constant"

    def generate(ids: torch.Tensor):
        saved = {key: getattr(config, key, None) for key in keys}
        for key, value in used.items():
            setattr(config, key, value)
        try:
            return target.generate(ids, assistant_model=draft, **sample)
        finally:
            for key, value in saved.items():
                setattr(config, key, value)

    name = f"transformers assisted generation ({setting})"
    return Method(name, generate, draft, {"assistant_generation_config": used})


def forward_costs(target, draft, device: torch.device, context: int = 200) -> dict:
    """Seconds of one target forward over k new tokens and of one draft step of k tokens (batch 1, cached
    context), in the form :func:`device_check.project_method` takes."""
    costs = {
        "target_forward_s": {str(k): forward_seconds(target, 1, k, device, context) for k in (1, 5, 17, 33)},
        "draft_step_s": {str(k): forward_seconds(draft, 1, k, device, context) for k in (1, 4)},
    }
    print("target forward (s) by new tokens:", {k: round(v, 4) for k, v in costs["target_forward_s"].items()})
    print("draft step (s) by tokens per row:", {k: round(v, 4) for k, v in costs["draft_step_s"].items()})
    return costs


def projection(costs: dict, ours: list[dict]) -> list[dict]:
    """Speedups over plain decoding implied by this machine's forward costs and each method's block efficiency
    and overhead (a check of the cost model eval/device_check.py applies to device costs)."""
    overhead = [r["overhead_s_per_block"] for r in ours if "overhead_s_per_block" in r]
    per_block = statistics.median(overhead) if overhead else 0.0
    rows = [project_method(r, costs, per_block) for r in ours if r.get("draft_forwards")]
    for row in rows:
        print(f"projected  {row['method']:<44} {row['projected_speedup']:5.2f}x")
    return rows


def draft_variants(args: argparse.Namespace, draft, packed_rows: int | None) -> dict[tuple[str, int], torch.nn.Module]:
    """The drafts the grid runs, by (int8 "off"/"on", kept vocabulary size, 0: all): copies of ``draft``
    (a restricted float32 head is packed like the other linears)."""
    variants = {}
    sizes = [int(x) for x in args.draft_vocab.split(",")]
    ranking = draft_vocab.load_ranking(args.draft_vocab_ranking or args.draft) if any(sizes) else None
    for quantized, size in itertools.product(args.draft_int8.split(","), sizes):
        variant = draft if quantized == "off" and size == 0 else copy.deepcopy(draft)
        if size:
            draft_vocab.restrict_vocabulary(variant, ranking, size)
        if quantized == "on":
            devices.quantize_int8(variant)
        elif size and packed_rows:
            devices.use_onednn_linear(variant, packed_rows)
        variants[quantized, size] = variant
    return variants


def our_methods(args: argparse.Namespace, target, drafts: dict, sample: dict) -> list[Method]:
    """The grid of this package's configurations given on the command line (``drafts``: see draft_variants)."""
    thresholds = [None if x == "none" else float(x) for x in args.confidence.split(",")]
    top_ks = [int(x) or None for x in args.top_k.split(",")]
    methods = []
    for name in args.verifiers.split(","):
        rule = verifiers.get(name)
        for n in (int(x) for x in args.drafts.split(",")):
            if rule.max_drafts is not None and n > rule.max_drafts:
                continue
            shapes = args.shapes.split(",") if n > 1 else args.shapes.split(",")[:1]  # one shape at n = 1
            for length, tree, tau, shape, top_k, (quantized, vocab) in itertools.product(
                (int(x) for x in args.lengths.split(",")), args.tree.split(","), thresholds, shapes, top_ks, drafts,
            ):  # fmt: skip
                options = {"num_drafts": n, "num_assistant_tokens": length, "verifier": name}
                options.update(tree_attention=tree == "on", assistant_confidence_threshold=tau, draft_shape=shape)
                options.update(assistant_top_k=top_k)
                assistant = drafts[quantized, vocab]

                def generate(ids, options=options, assistant=assistant):
                    return hf_globalres.generate(
                        target, ids, assistant_model=assistant, return_dict_in_generate=True, **options, **sample
                    )

                label = f"ours {name} n={n} L={length}" + ("" if tree == "on" else " rows")
                label += "" if tau is None else f" τ={tau}"
                label += "" if shape == "tree" else f" {shape}"
                label += "" if top_k is None else f" top-k={top_k}"
                label += "" if quantized == "off" else " int8-draft"
                label += "" if vocab == 0 else f" vocab={vocab}"
                fields = dict(n=n, L=length, tree=tree == "on", verifier=name, confidence_threshold=tau)
                fields.update(draft_shape=shape, assistant_top_k=top_k, draft_int8=quantized == "on")
                fields.update(draft_vocab=vocab or None)
                methods.append(Method(label, generate, assistant, fields))
    return methods


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", default="qwen2.5-coder-1.5b-instruct")
    parser.add_argument("--draft", default="qwen2.5-coder-0.5b-instruct")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--prompts", type=int, default=10)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--verifiers", default=",".join(verifiers.available()))
    parser.add_argument("--drafts", default="1,2,4,8")
    parser.add_argument("--lengths", default="2,4,8")
    parser.add_argument("--tree", default="on,off")
    parser.add_argument(
        "--confidence",
        default="none",
        help="assistant_confidence_threshold values for ours ('none': every branch drafts L tokens)",
    )
    parser.add_argument("--shapes", default="tree", help="draft_shape values for ours: tree, spine")
    parser.add_argument("--top-k", default="0", help="assistant_top_k values for ours (0: the whole draft law)")
    parser.add_argument(
        "--draft-int8",
        default="off",
        help="ours with the draft's linear layers in int8 (devices.quantize_int8): off,on",
    )
    parser.add_argument(
        "--draft-vocab",
        default="0",
        help="ours with the draft's LM head over the first N ids of its ranking and the prompt's tokens "
        "(draft_vocab.restrict_vocabulary): e.g. 0,32768 (0: the whole vocabulary)",
    )
    parser.add_argument("--draft-vocab-ranking", help="ranking file (default: the one shipped for --draft)")
    parser.add_argument("--dtype", default="auto", choices=devices.DTYPE_CHOICES)
    parser.add_argument(
        "--onednn",
        default="auto",
        choices=["auto", "on", "off"],
        help="float32 CPU linears through oneDNN for every method (devices.use_onednn_linear); auto: on for "
        "float32 on a CPU",
    )
    parser.add_argument(
        "--assisted",
        default="default,4",
        help="transformers assisted generation settings: 'default' (the draft's generation config: L = 20 "
        "with its confidence threshold 0.4), 'heuristic' (its L schedule), or a static L",
    )
    parser.add_argument(
        "--pack-rows",
        type=int,
        default=devices.PACK_ROWS,
        help="with oneDNN, lay the linears' weights out for this many rows once (devices.PackedLinear); 0: unpacked",
    )
    parser.add_argument("--greedy", action="store_true", help="greedy decoding (T = 0) instead of sampling at T = 1")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=Path("eval/results/bench_generate.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    dtype = devices.resolve_dtype(args.dtype, "cuda" if torch.cuda.is_available() else "cpu")
    target, draft, tokenizer = load_pair(args.target, args.draft, dtype)
    device = target.device
    onednn = args.onednn == "on" or (args.onednn == "auto" and device.type == "cpu" and dtype == torch.float32)
    packed_rows = (args.pack_rows or None) if onednn else None
    if onednn:
        devices.use_onednn_linear(target, packed_rows)
        devices.use_onednn_linear(draft, packed_rows)
    prompts = [p.to(device) for p in gsm8k_prompts(args.data, args.prompts, tokenizer)]
    sample = {"do_sample": True, "temperature": 1.0, "top_k": 0, "top_p": 1.0, "max_new_tokens": args.max_new_tokens}
    if args.greedy:
        sample = {"do_sample": False, "max_new_tokens": args.max_new_tokens}
    setting = {
        "dtype": str(dtype).removeprefix("torch."), "onednn_linear": onednn, "packed_rows": packed_rows,
        "device": str(device),
    }  # fmt: skip
    linears = f"on, packed for {packed_rows} rows" if packed_rows else "on" if onednn else "off"
    print(
        f"{len(prompts)} GSM8K prompts, {args.max_new_tokens} new tokens, {'greedy' if args.greedy else 'T = 1'}, "
        f"{device}, {setting['dtype']}, oneDNN linears {linears}, {args.threads} threads"
    )
    with torch.no_grad():  # page both models' weights in, so every method's peak counts both models
        target(prompts[0])
        draft(prompts[0])
    methods = [Method("plain sampling", lambda ids: target.generate(ids, **sample))]
    methods += [assisted_method(setting_name, target, draft, sample) for setting_name in args.assisted.split(",")]
    drafts = draft_variants(args, draft, packed_rows)
    methods += our_methods(args, target, drafts, sample)
    results = run_methods(methods, prompts, target, args.seed)
    for r in results:
        if "n" in r:
            r["overhead_s_per_block"] = r.get("overhead_share", 0.0) * r["seconds"] / max(r["target_forwards"], 1)
    plain = results[0]
    assisted = max((r for r in results if r["method"].startswith("transformers")), key=lambda r: r["tokens_per_s"])
    ours = [r for r in results if "n" in r]
    summary = {}
    if ours:
        best = max(ours, key=lambda r: r["tokens_per_s"])
        by_rule = {}
        for r in ours:
            if r["n"] > 1 and r["tokens_per_s"] > by_rule.get(r["verifier"], {}).get("tokens_per_s", 0):
                by_rule[r["verifier"]] = r
        summary = {
            "setting": setting,
            "best": best["method"],
            "best_tokens_per_s": best["tokens_per_s"],
            "speedup_vs_plain": best["tokens_per_s"] / plain["tokens_per_s"],
            "best_assisted": assisted["method"],
            "speedup_vs_best_assisted": best["tokens_per_s"] / assisted["tokens_per_s"],
            "best_multi_draft_by_verifier": {
                k: {"method": r["method"], "tokens_per_s": r["tokens_per_s"], "overhead_share": r["overhead_share"]}
                for k, r in by_rule.items()
            },
        }
        print("summary:", json.dumps(summary, indent=1))
    (quantized, vocab), timed_draft = next(iter(drafts.items()))  # the first draft the methods ran
    costs = forward_costs(target, timed_draft, device)
    costs.update(draft_int8=quantized == "on", draft_vocab=vocab or None)
    report = {
        "machine": machine(**setting),
        "args": {k: str(v) for k, v in vars(args).items()},
        "results": results,
        "summary": summary,
        "forward_costs": costs,
        "projection": projection(costs, ours),
    }
    write_report(args.json, report)
    print(f"device projection: python eval/device_check.py --bench-report {args.json}")


if __name__ == "__main__":
    main()
