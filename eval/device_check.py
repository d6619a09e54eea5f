"""One accelerator check: prove the CUDA path works and measure it, in one JSON and one printed table.

    python eval/device_check.py --json eval/reports/device/device_check.json
    python eval/device_check.py --device cpu --quick --json /tmp/device_check.json   # every step, tiny sizes

Sections, in order; each runs even when an earlier one failed (its error is recorded), and a time
budget (``--budget``, 450 s by default) stops the optional ones (3-6) before 8 minutes:

1. ``pytest``: ``pytest -k cuda -q`` on the repository's tests; pass/fail counts.
2. ``agreement``: for every registered verifier, ``conditional(q, p, drafts)`` on the device against
   the CPU at V = 50 and V = 5000 (float64, n = 4 drafts, 1 for ``single``, distinct drafts for rules
   drawn without replacement, ``optimal`` with ``bins=64`` so V = 5000 takes its grouped-weight path);
   max |difference| against a tolerance that allows different Newton iteration counts (1e-6).
3. ``verify_timing``: ``verify`` at V = 152064, n = 4, B ∈ {1, 8, 64}, full support and top-k support
   (k ∈ {64, 1000}, p handed on its k tokens as ``verifiers.SparseRows``, as the generate loop does):
   median of ≥ 10 timed calls after a warm-up (``torch.cuda.synchronize``), peak memory above the inputs
   (``torch.cuda.max_memory_allocated``), host reads (a dispatch-mode counter) and synchronisations
   (``torch.cuda.set_sync_debug_mode("warn")``). A combination a rule refuses, or one whose warm-up at a
   smaller B predicts more time than the budget affords, is recorded with the reason.
4. ``profile``: ``torch.profiler`` summary of ``optimal.verify`` at B = 64, top-1000: kernel launches,
   time in ``cudaStreamSynchronize`` / ``cudaMemcpy*``, the 10 kernels with the most device time.
5. ``block_loop``: random-weight models of real sizes (a Qwen2-7B-like target, a Qwen2-0.5B-like draft,
   bf16, built on the device without weight initialisation), B ∈ {1, 64}: ``hf_globalres.generate``
   with ``num_drafts=4`` and its per-phase ``timings``; target forward cost at 1 and 1 + K new tokens,
   draft step cost at 1 and n tokens per row.
6. ``projection``: end-to-end speedups over autoregressive decoding *projected* from those costs and the
   block efficiencies measured on the CPU (``eval/reports/bench/bench_generate-cpu-fp32-grid1.json``).

``--device cpu`` runs every section on tiny sizes (V = 500, tiny configs, B ∈ {1, 4}); there the
agreement compares the CPU path with the accelerator code path on CPU tensors, and host reads are
counted on the accelerator path (see ``hf_globalres._sync``). ``--quick`` takes fewer repeats and
shorter generations. The JSON is rewritten after every section, so a run cut short keeps what it did.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import itertools
import json
import math
import os
import platform
import re
import shlex
import statistics
import subprocess
import sys
import time
import traceback
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # the package and the test helpers from this checkout, installed or not
    sys.path.insert(0, str(ROOT))

import hf_globalres  # noqa: E402
from hf_globalres import verifiers  # noqa: E402
from hf_globalres.generation.tree import cache_argument  # noqa: E402
from hf_globalres.verifiers._selection import FittedVerifier  # noqa: E402
from tests.syncs import SyncCounter, accelerator_path  # noqa: E402

BENCH_REPORT = ROOT / "eval" / "reports" / "bench" / "bench_generate-cpu-fp32-grid1.json"
DEFAULT_PYTEST_ARGS = "tests -k cuda -q -p no:cacheprovider"
#: Largest |conditional(device) − conditional(CPU)|: Newton solves may stop after different iteration counts.
AGREEMENT_TOLERANCE = 1e-6
NUM_DRAFTS = 4

QWEN2_7B_LIKE = {
    "vocab_size": 152064, "hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28,
    "num_attention_heads": 28, "num_key_value_heads": 4, "max_position_embeddings": 4096,
}  # fmt: skip
QWEN2_05B_LIKE = {
    "vocab_size": 152064, "hidden_size": 896, "intermediate_size": 4864, "num_hidden_layers": 24,
    "num_attention_heads": 14, "num_key_value_heads": 2, "max_position_embeddings": 4096, "tie_word_embeddings": True,
}  # fmt: skip
TINY_TARGET = {
    "vocab_size": 500, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
    "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 256,
}  # fmt: skip
TINY_DRAFT = {
    "vocab_size": 500, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
    "num_attention_heads": 2, "num_key_value_heads": 1, "max_position_embeddings": 256, "tie_word_embeddings": True,
}  # fmt: skip


@dataclass(frozen=True)
class Sizes:
    """Problem sizes of one run: real sizes on an accelerator, tiny ones on a CPU."""

    agreement_vocabs: tuple[int, ...]
    vocab: int
    batches: tuple[int, ...]
    top_ks: tuple[int, ...]
    repeats: int
    min_repeats: int
    call_cap_s: float  # a rule slower than this per timed series takes fewer repeats (down to min_repeats)
    call_limit_s: float  # a case predicted to take longer than this per call is skipped (recorded)
    target: dict[str, Any]
    draft: dict[str, Any]
    loop_batches: tuple[int, ...]
    prompt_len: int
    max_new_tokens: int
    draft_length: int  # L, draft tokens per branch in the block loop
    cost_context: int  # cached tokens under the timed forwards
    agreement_bins: int  # ``optimal``'s bins in the agreement, below V / 2 so the largest V takes the grouped path
    fitted_options: dict[str, int]  # options of the fitted rules (on a CPU: small solves, to keep seconds)
    reserve_s: float  # time kept for the profile and the block loop when verify timing runs long
    profile_calls: int


def sizes_for(device: torch.device, quick: bool) -> Sizes:
    """Real sizes on an accelerator; on a CPU V = 500, tiny models, B ∈ {1, 4} (seconds per section)."""
    if device.type == "cpu":
        return Sizes(
            agreement_vocabs=(50, 200), vocab=500, batches=(1, 4), top_ks=(16, 64),
            repeats=3, min_repeats=1, call_cap_s=0.3, call_limit_s=5.0,
            target=TINY_TARGET, draft=TINY_DRAFT, loop_batches=(1, 4), prompt_len=8,
            max_new_tokens=6 if quick else 12, draft_length=2, cost_context=16,
            agreement_bins=16, fitted_options={"max_iters": 10, "max_support": 12, "max_tuples": 500},
            reserve_s=10.0, profile_calls=1,
        )  # fmt: skip
    return Sizes(
        agreement_vocabs=(50, 5000), vocab=152064, batches=(1, 64) if quick else (1, 8, 64), top_ks=(64, 1000),
        repeats=10, min_repeats=3, call_cap_s=8.0 if quick else 15.0, call_limit_s=20.0,
        target=QWEN2_7B_LIKE, draft=QWEN2_05B_LIKE, loop_batches=(1, 64), prompt_len=64,
        max_new_tokens=16 if quick else 32, draft_length=4, cost_context=256,
        agreement_bins=64, fitted_options={},
        reserve_s=150.0, profile_calls=5,
    )  # fmt: skip


@dataclass
class Budget:
    """Wall-clock budget of the whole run."""

    total_s: float
    start: float = field(default_factory=time.perf_counter)

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def remaining(self) -> float:
        return self.total_s - self.elapsed()


@dataclass
class Context:
    """What every section reads: device, sizes, budget, options and the earlier sections' results."""

    device: torch.device
    sizes: Sizes
    budget: Budget
    pytest_args: str
    bench_report: Path
    results: dict[str, dict[str, Any]] = field(default_factory=dict)


# ----------------------------------------------------------------------------------------------------------------
# Shared helpers


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def random_case(
    batch: int, vocab: int, support: int | None, device: torch.device, seed: int, dtype: torch.dtype = torch.float32
) -> tuple[torch.Tensor, torch.Tensor]:
    """(q, p) [B, V]: softmax(z + 0.7 ε₁), softmax(z + 0.7 ε₂), z ~ 2·N(0, 1).

    With ``support = k`` each of q and p keeps its own k largest logits (zero mass elsewhere), as a
    top-k sampling processor leaves them.
    """
    g = torch.Generator(device=device).manual_seed(seed)
    base = 2 * torch.randn(batch, vocab, generator=g, device=device, dtype=dtype)
    laws = []
    for _ in range(2):
        logits = base + 0.7 * torch.randn(batch, vocab, generator=g, device=device, dtype=dtype)
        if support is not None:
            values, index = logits.topk(support, dim=-1)
            logits = torch.full_like(logits, -math.inf).scatter(1, index, values)
        laws.append(torch.softmax(logits, -1))
    return laws[0], laws[1]


def held_on_support(p: torch.Tensor, support: int | None) -> torch.Tensor | verifiers.SparseRows:
    """p as the generate loop hands it to a verifier: with a top-k ``support``, on its k tokens (SparseRows)."""
    if support is None:
        return p
    tokens = p.topk(support, dim=-1).indices
    return verifiers.SparseRows(tokens, p.gather(1, tokens), p.shape[1])


def draw_drafts(rule: verifiers.Verifier, p: torch.Tensor, seed: int) -> torch.Tensor:
    """[B, n] drafts from p under the rule's draft scheme, n = 4 (or the rule's maximum, if lower)."""
    n = min(NUM_DRAFTS, rule.max_drafts or NUM_DRAFTS)
    g = torch.Generator(device=p.device).manual_seed(seed)
    return torch.multinomial(p, n, replacement=rule.draft_scheme == "iid", generator=g)


def rule_options(name: str, sizes: Sizes, *, agreement: bool = False) -> dict[str, Any]:
    """Constructor options: ``optimal``'s ``bins`` in the agreement (so the largest V takes its grouped path);
    the fitted rules' ``fitted_options`` (both sides of a comparison use the same)."""
    options: dict[str, Any] = {}
    if agreement and name == "optimal":
        options["bins"] = sizes.agreement_bins
    if isinstance(verifiers.get(name), FittedVerifier):
        options.update(sizes.fitted_options)
    return options


def count_syncs(call: Callable[[], Any], device: torch.device) -> dict[str, Any]:
    """Host reads of one call (dispatch-mode count; on a CPU, of the accelerator code path) and, on CUDA,
    the synchronisations ``torch.cuda.set_sync_debug_mode("warn")`` reports."""
    with contextlib.ExitStack() as stack:
        if device.type == "cpu":
            stack.enter_context(accelerator_path())
        counter = stack.enter_context(SyncCounter())
        caught = stack.enter_context(warnings.catch_warnings(record=True))
        warnings.simplefilter("always")
        if device.type == "cuda":
            torch.cuda.set_sync_debug_mode("warn")
            stack.callback(torch.cuda.set_sync_debug_mode, "default")
        call()
        synchronize(device)
    synced = sum("synchroniz" in str(w.message) for w in caught) if device.type == "cuda" else None
    return {"host_reads": counter.total, "host_reads_by_kind": dict(counter.counts), "sync_warnings": synced}


def peak_memory_mib(call: Callable[[], Any], device: torch.device) -> float | None:
    """Device memory one call allocates above what was allocated before it (None on a CPU)."""
    if device.type != "cuda":
        return None
    synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    call()
    synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - before) / 2**20


def timed_calls(call: Callable[[], Any], device: torch.device, sizes: Sizes) -> tuple[list[float], float]:
    """(seconds of each timed call, seconds of the warm-up call): ``sizes.repeats`` calls, fewer (at least
    ``sizes.min_repeats``) when the warm-up says they would take more than ``sizes.call_cap_s``."""
    synchronize(device)
    start = time.perf_counter()
    call()
    synchronize(device)
    warm = time.perf_counter() - start
    count = sizes.repeats
    if warm * count > sizes.call_cap_s:
        count = max(sizes.min_repeats, int(sizes.call_cap_s / max(warm, 1e-9)))
    times = []
    for _ in range(count):
        start = time.perf_counter()
        call()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return times, warm


def error_text(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}"


# ----------------------------------------------------------------------------------------------------------------
# 1. pytest -k cuda

PYTEST_COUNT = re.compile(r"(\d+) (passed|failed|skipped|deselected|errors?|xfailed|xpassed)")


def section_pytest(ctx: Context) -> dict[str, Any]:
    """Run the repository's CUDA tests in a subprocess; counts from pytest's last line."""
    timeout = max(30.0, min(240.0, ctx.budget.remaining() - ctx.sizes.reserve_s - 60.0))
    command = [sys.executable, "-m", "pytest", *shlex.split(ctx.pytest_args)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    try:
        done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as expired:
        output = expired.stdout.decode() if isinstance(expired.stdout, bytes) else expired.stdout or ""
        return {"ok": False, "command": shlex.join(command), "error": f"timed out after {timeout:.0f} s",
                "output_tail": output[-2000:]}  # fmt: skip
    output = done.stdout + done.stderr
    counts: dict[str, int] = {}
    for number, kind in PYTEST_COUNT.findall(output.strip().splitlines()[-1] if output.strip() else ""):
        counts["errors" if kind.startswith("error") else kind] = int(number)
    return {
        "ok": done.returncode == 0 and counts.get("failed", 0) == 0 and counts.get("errors", 0) == 0,
        "command": shlex.join(command),
        "returncode": done.returncode,
        "counts": counts,
        "output_tail": output[-2000:],
    }


# ----------------------------------------------------------------------------------------------------------------
# 2. Device against CPU


def agreement_pair(name: str, vocab: int, ctx: Context) -> dict[str, Any]:
    """max |conditional on the device − conditional on the CPU| for one rule at one V (float64, B = 2)."""
    options = rule_options(name, ctx.sizes, agreement=True)
    rule = verifiers.get(name, **options)
    q, p = random_case(2, vocab, None, torch.device("cpu"), seed=vocab, dtype=torch.float64)
    drafts = draw_drafts(rule, p, seed=vocab + 1)
    start = time.perf_counter()
    reference = rule.conditional(q, p, drafts)
    cpu_s = time.perf_counter() - start
    start = time.perf_counter()
    if ctx.device.type == "cpu":
        with accelerator_path():
            law = rule.conditional(q, p, drafts)
    else:
        law = rule.conditional(q.to(ctx.device), p.to(ctx.device), drafts.to(ctx.device)).cpu()
    device_s = time.perf_counter() - start
    difference = float((law - reference).abs().max())
    row_sums = float((law.sum(-1) - 1).abs().max())
    return {
        "verifier": name, "vocab": vocab, "n": drafts.shape[1], "options": options,
        "max_abs_diff": difference, "row_sum_error": row_sums, "cpu_s": cpu_s, "device_s": device_s,
        "ok": difference <= AGREEMENT_TOLERANCE and row_sums <= AGREEMENT_TOLERANCE,
    }  # fmt: skip


def section_agreement(ctx: Context) -> dict[str, Any]:
    """Every registered rule at every agreement V; one failing pair is recorded, the others still run."""
    rows = []
    for vocab in ctx.sizes.agreement_vocabs:
        for name in verifiers.available():
            try:
                rows.append(agreement_pair(name, vocab, ctx))
            except Exception as error:
                rows.append({"verifier": name, "vocab": vocab, "ok": False, "error": error_text(error)})
    differences = [row["max_abs_diff"] for row in rows if "max_abs_diff" in row]
    return {
        "ok": all(row["ok"] for row in rows),
        "tolerance": AGREEMENT_TOLERANCE,
        "compared": "cpu vs accelerator code path on cpu" if ctx.device.type == "cpu" else f"{ctx.device} vs cpu",
        "max_abs_diff": max(differences, default=math.nan),
        "rows": rows,
    }


# ----------------------------------------------------------------------------------------------------------------
# 3. verify: time, memory, host reads


def time_verify(
    name: str, q: torch.Tensor, p: torch.Tensor, ctx: Context, support: int | None = None
) -> dict[str, Any]:
    """One rule on one (B, support) case: median time, peak memory, host reads; a refusal is recorded.

    A top-k p is handed over on its support (:func:`held_on_support`), as the generate loop does.
    """
    options = rule_options(name, ctx.sizes)
    rule = verifiers.get(name, **options)
    drafts = draw_drafts(rule, p, seed=7)
    held = held_on_support(p, support)
    g = torch.Generator(device=ctx.device).manual_seed(0)
    row: dict[str, Any] = {"verifier": name, "n": drafts.shape[1], "options": options}

    def call() -> Any:
        return rule.verify(q, held, drafts, generator=g)

    try:
        times, warm = timed_calls(call, ctx.device, ctx.sizes)
    except (ValueError, NotImplementedError) as error:  # the rule refuses this case: record why
        return {**row, "skipped": error_text(error)}
    row.update(median_ms=1e3 * statistics.median(times), min_ms=1e3 * min(times), warmup_ms=1e3 * warm)
    row["repeats"] = len(times)
    if len(times) < ctx.sizes.repeats:
        row["note"] = f"{len(times)} repeats: one call takes {warm:.2f} s (cap {ctx.sizes.call_cap_s:.0f} s)"
    row["peak_memory_mib"] = peak_memory_mib(call, ctx.device)
    row.update(count_syncs(call, ctx.device))
    stats = getattr(rule, "last_stats", None)
    if stats is not None and hasattr(stats, "failure_rate"):
        row.update(failure_rate=float(stats.failure_rate), solver_iterations=int(stats.iterations))
    return row


def budget_skip(ctx: Context, earlier: tuple[int, float] | None, batch: int) -> str | None:
    """Why a case should not start, or None: only the reserve is left, or the rule's warm-up at a smaller B
    predicts (linearly in B) a call longer than ``call_limit_s`` or than the time left."""
    if ctx.budget.remaining() < ctx.sizes.reserve_s:
        return "time budget: kept for later sections"
    if earlier is None:
        return None
    smaller, seconds = earlier
    predicted = seconds * batch / smaller
    spare = ctx.budget.remaining() - ctx.sizes.reserve_s
    if predicted > ctx.sizes.call_limit_s or predicted * (2 + ctx.sizes.min_repeats) > spare:
        return f"time budget: a call is predicted to take {predicted:.1f} s (B = {smaller} took {seconds:.2f} s)"
    return None


def section_verify_timing(ctx: Context) -> dict[str, Any]:
    """Every rule × support (full, top-k) × B at V, B ascending; cases the budget cannot afford say so."""
    rows = []
    warmups: dict[tuple[str, int | None], tuple[int, float]] = {}  # (rule, support) → (B, warm-up seconds)
    for support in (None, *ctx.sizes.top_ks):
        for batch in sorted(ctx.sizes.batches):
            q, p = random_case(batch, ctx.sizes.vocab, support, ctx.device, seed=batch)
            for name in verifiers.available():
                case = {
                    "verifier": name,
                    "batch": batch,
                    "vocab": ctx.sizes.vocab,
                    "support": support or ctx.sizes.vocab,
                    "draft_probs": "dense" if support is None else "SparseRows",
                }
                reason = budget_skip(ctx, warmups.get((name, support)), batch)
                if reason is not None:
                    rows.append({**case, "skipped": reason})
                    continue
                try:
                    rows.append({**case, **time_verify(name, q, p, ctx, support)})
                except Exception as error:
                    rows.append({**case, "error": error_text(error)})
                    if ctx.device.type == "cuda":
                        torch.cuda.empty_cache()
                if "warmup_ms" in rows[-1]:
                    warmups[(name, support)] = (batch, rows[-1]["warmup_ms"] / 1e3)
            del q, p
    errors = [row for row in rows if "error" in row]
    return {"ok": not errors, "rows": rows, "timed": sum("median_ms" in row for row in rows), "errors": len(errors)}


# ----------------------------------------------------------------------------------------------------------------
# 4. Profile of optimal

SYNC_CALLS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize")


def _device_time_us(event: Any) -> float:
    """Self device time of a profiler average (``self_device_time_total`` from torch 2.4, ``self_cuda_...`` before)."""
    for attribute in ("self_device_time_total", "self_cuda_time_total"):
        if hasattr(event, attribute):
            return float(getattr(event, attribute))
    return 0.0


def profile_summary(averages: list[Any], device: torch.device, calls: int) -> dict[str, Any]:
    """Launches, synchronisation and copy time, operator count and the top 10 kernels (CPU ops on a CPU)."""
    from torch.autograd import DeviceType

    def total_us(prefixes: tuple[str, ...]) -> float:
        return sum(e.cpu_time_total for e in averages if e.key.startswith(prefixes))

    launches = sum(e.count for e in averages if "LaunchKernel" in e.key)
    if device.type == "cuda":
        kernels = [e for e in averages if e.device_type == DeviceType.CUDA]
        top = sorted(kernels, key=_device_time_us, reverse=True)[:10]
        top_rows = [{"kernel": e.key[:120], "calls": e.count, "device_us": _device_time_us(e)} for e in top]
    else:
        top = sorted(averages, key=lambda e: e.self_cpu_time_total, reverse=True)[:10]
        top_rows = [{"kernel": e.key[:120], "calls": e.count, "cpu_us": float(e.self_cpu_time_total)} for e in top]
    return {
        "calls": calls,
        "kernel_launches_per_call": launches / calls,
        "aten_ops_per_call": sum(e.count for e in averages if e.key.startswith("aten::")) / calls,
        "synchronize_us_per_call": total_us(SYNC_CALLS) / calls,
        "synchronize_count_per_call": sum(e.count for e in averages if e.key.startswith(SYNC_CALLS)) / calls,
        "memcpy_us_per_call": total_us(("cudaMemcpy",)) / calls,
        "memcpy_count_per_call": sum(e.count for e in averages if e.key.startswith("cudaMemcpy")) / calls,
        "top_kernels": top_rows,
    }


def section_profile(ctx: Context) -> dict[str, Any]:
    """torch.profiler over ``profile_calls`` calls of ``optimal.verify`` at the largest B and the largest top-k."""
    calls = ctx.sizes.profile_calls
    from torch.profiler import ProfilerActivity, profile

    batch, support = max(ctx.sizes.batches), max(ctx.sizes.top_ks)
    q, p = random_case(batch, ctx.sizes.vocab, support, ctx.device, seed=11)
    rule = verifiers.get("optimal")
    drafts = draw_drafts(rule, p, seed=12)
    p = held_on_support(p, support)
    g = torch.Generator(device=ctx.device).manual_seed(0)
    rule.verify(q, p, drafts, generator=g)  # warm-up: allocator, kernels' first launch
    synchronize(ctx.device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if ctx.device.type == "cuda" else [])
    start = time.perf_counter()
    with profile(activities=activities) as prof:
        for _ in range(calls):
            rule.verify(q, p, drafts, generator=g)
        synchronize(ctx.device)
    wall = time.perf_counter() - start
    summary = profile_summary(list(prof.key_averages()), ctx.device, calls)
    return {"ok": True, "verifier": "optimal", "batch": batch, "vocab": ctx.sizes.vocab, "support": support,
            "n": drafts.shape[1], "profiled_ms_per_call": 1e3 * wall / calls, **summary}  # fmt: skip


# ----------------------------------------------------------------------------------------------------------------
# 5. Block loop on random-weight models of real sizes


@contextlib.contextmanager
def skipped_weight_init(dtype: torch.dtype) -> Iterator[None]:
    """Build modules in ``dtype`` without running weight initialisers (transformers' ``no_init_weights``
    where this version has it); :func:`fill_random` then writes the weights once, on the device."""
    try:
        from transformers.initialization import no_init_weights
    except ImportError:
        try:
            from transformers.modeling_utils import no_init_weights  # type: ignore[no-redef]
        except ImportError:
            no_init_weights = contextlib.nullcontext  # type: ignore[assignment]
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with no_init_weights():
            yield
    finally:
        torch.set_default_dtype(previous)


@torch.no_grad()
def fill_random(model: torch.nn.Module, seed: int, std: float = 0.02) -> None:
    """Matrices ~ N(0, std²), norm scales 1, biases 0 (the usual init, drawn by one generator on the device)."""
    g = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    for name, parameter in model.named_parameters():
        if parameter.dim() > 1:
            parameter.normal_(0.0, std, generator=g)
        elif "norm" in name:
            parameter.fill_(1.0)
        else:
            parameter.zero_()


def build_model(config: dict[str, Any], device: torch.device, dtype: torch.dtype, seed: int) -> torch.nn.Module:
    """A random-weight ``Qwen2ForCausalLM`` built directly on ``device`` (no CPU copy, no init pass)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    settings = {**config, "bos_token_id": None, "eos_token_id": None, "pad_token_id": 0}
    with skipped_weight_init(dtype), torch.device(device):
        model = Qwen2ForCausalLM(Qwen2Config(**settings))
    fill_random(model, seed)
    model.generation_config.eos_token_id = None  # random weights: every row runs to max_new_tokens
    model.generation_config.pad_token_id = 0
    return model.eval()


def _rewind(cache: Any, length: int) -> None:
    """Drop every cached position past ``length`` (the timed forward's new tokens)."""
    for layer in cache.layers:
        layer.keys, layer.values = layer.keys[..., :length, :], layer.values[..., :length, :]


@torch.no_grad()
def forward_seconds(
    model: torch.nn.Module, batch: int, new_tokens: int, device: torch.device, context: int, repeats: int = 3
) -> float:
    """Median seconds of one forward of ``new_tokens`` tokens per row on a cache of ``context`` tokens
    (eval/bench_generate.py times the CPU pair with it too)."""
    g = torch.Generator(device=device).manual_seed(batch + new_tokens)
    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (batch, context), generator=g, device=device)
    name = cache_argument(model)
    cache = getattr(model(ids, use_cache=True, logits_to_keep=1), name)
    step = torch.randint(0, vocab, (batch, new_tokens), generator=g, device=device)
    samples = []
    for index in range(repeats + 1):  # the first is a warm-up (kernel selection for this shape)
        synchronize(device)
        start = time.perf_counter()
        model(step, use_cache=True, **{name: cache})
        synchronize(device)
        if index:
            samples.append(time.perf_counter() - start)
        _rewind(cache, context)
    return statistics.median(samples)


def target_token_counts(ctx: Context) -> list[int]:
    """New tokens per timed target forward: 1, and 1 + K for the trees of n = 4 branches at depths 1, the
    block loop's L, and 12 (the CPU runs' L), K = n·depth (an upper bound when branches stop early)."""
    depths = (1, ctx.sizes.draft_length, 12)
    return sorted({1, *(1 + NUM_DRAFTS * depth for depth in depths)})


def run_generate(target: torch.nn.Module, draft: torch.nn.Module, batch: int, ctx: Context) -> dict[str, Any]:
    """One timed ``hf_globalres.generate`` call at batch ``batch`` (after a short warm-up call)."""
    sizes = ctx.sizes
    g = torch.Generator(device=ctx.device).manual_seed(batch)
    ids = torch.randint(1, target.config.vocab_size, (batch, sizes.prompt_len), generator=g, device=ctx.device)
    options = {
        "attention_mask": torch.ones_like(ids), "assistant_model": draft, "num_drafts": NUM_DRAFTS,
        "num_assistant_tokens": sizes.draft_length, "assistant_confidence_threshold": None, "do_sample": True,
        "temperature": 1.0, "top_k": 0, "top_p": 1.0, "return_dict_in_generate": True,
    }  # fmt: skip
    # Without a confidence stop every branch drafts L tokens: random weights give no confident draft.
    hf_globalres.generate(target, ids, max_new_tokens=2, generator=g, **options)
    if ctx.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(ctx.device)
    synchronize(ctx.device)
    start = time.perf_counter()
    out = hf_globalres.generate(target, ids, max_new_tokens=sizes.max_new_tokens, generator=g, **options)
    synchronize(ctx.device)
    wall = time.perf_counter() - start
    new_tokens = out.sequences.shape[1] - ids.shape[1]
    forwards = out.target_forwards.float()
    blocks = int(out.target_forwards.max())  # loop iterations: every block runs one target forward
    timings = dict(out.timings)
    outside_models = timings["total"] - timings["target_forward"] - timings["draft_forward"]
    return {
        "batch": batch, "new_tokens_per_row": new_tokens, "wall_s": wall, "tokens_per_s": batch * new_tokens / wall,
        "blocks": blocks, "block_efficiency": float((new_tokens / forwards).mean()), "timings": timings,
        "overhead_s_per_block": outside_models / blocks, "verifier_s_per_block": timings["verifier"] / blocks,
        "peak_memory_gib": torch.cuda.max_memory_allocated(ctx.device) / 2**30 if ctx.device.type == "cuda" else None,
    }  # fmt: skip


def loop_costs(target: torch.nn.Module, draft: torch.nn.Module, batch: int, ctx: Context) -> dict[str, Any]:
    """Target forward seconds by new tokens per row, draft step seconds at 1 and n tokens per row."""

    def timed(model: torch.nn.Module, new_tokens: int) -> float:
        return forward_seconds(model, batch, new_tokens, ctx.device, ctx.sizes.cost_context)

    return {
        "target_forward_s": {str(k): timed(target, k) for k in target_token_counts(ctx)},
        "draft_step_s": {str(k): timed(draft, k) for k in (1, NUM_DRAFTS)},
    }


def section_block_loop(ctx: Context) -> dict[str, Any]:
    """Build both models on the device, then per B: a generate call and the forward costs."""
    dtype = torch.bfloat16 if ctx.device.type == "cuda" else torch.float32
    start = time.perf_counter()
    target = build_model(ctx.sizes.target, ctx.device, dtype, seed=0)
    draft = build_model(ctx.sizes.draft, ctx.device, dtype, seed=1)
    synchronize(ctx.device)
    result: dict[str, Any] = {"dtype": str(dtype).removeprefix("torch."), "build_s": time.perf_counter() - start}
    result.update(target_config=ctx.sizes.target, draft_config=ctx.sizes.draft, num_drafts=NUM_DRAFTS)
    result.update(draft_length=ctx.sizes.draft_length, cost_context=ctx.sizes.cost_context, batches={})
    for batch in ctx.sizes.loop_batches:
        if ctx.budget.remaining() < 0.1 * ctx.sizes.reserve_s:
            result["batches"][str(batch)] = {"skipped": "time budget"}
            continue
        try:
            row = run_generate(target, draft, batch, ctx)
            row["costs"] = loop_costs(target, draft, batch, ctx)
        except Exception as error:
            row = {"error": error_text(error)}
            if ctx.device.type == "cuda":
                torch.cuda.empty_cache()
        result["batches"][str(batch)] = row
    result["ok"] = all("error" not in row for row in result["batches"].values())
    return result


# ----------------------------------------------------------------------------------------------------------------
# 6. Projected speedups


def interpolate(x: float, costs: dict[str, float]) -> float:
    """Piecewise-linear cost at ``x`` tokens through the measured points (linear beyond the last two)."""
    points = sorted((int(k), v) for k, v in costs.items())
    if len(points) == 1:
        return points[0][1]
    for (x0, y0), (x1, y1) in itertools.pairwise(points):
        if x <= x1 or (x1, y1) == points[-1]:
            return y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    raise AssertionError("unreachable")


def project_method(record: dict[str, Any], costs: dict[str, Any], overhead_s: float) -> dict[str, Any]:
    """Projected speedup of one CPU-measured method over autoregressive decoding at the device's costs.

    Per block: ``s`` draft steps (the run's draft forwards per target forward) of n tokens per row (tree;
    1 for the spine and a single chain), one target forward over 1 + n·s tokens (an upper bound: branches
    share prefixes and stop early), and the package's own time per block measured in the block loop:

        speedup = block_efficiency · t_target(1) / (s · t_draft(tokens per step) + t_target(1 + n·s) + overhead)
    """
    n = int(record.get("n") or 1)
    steps = record["draft_forwards"] / max(record["target_forwards"], 1)
    per_step = n if record.get("draft_shape", "tree") == "tree" else 1
    block = (
        steps * interpolate(per_step, costs["draft_step_s"])
        + interpolate(1 + n * steps, costs["target_forward_s"])
        + overhead_s
    )
    return {
        "method": record["method"], "n": n, "block_efficiency": record["block_efficiency"],
        "draft_steps_per_block": steps, "projected_block_s": block,
        "projected_speedup": record["block_efficiency"] * costs["target_forward_s"]["1"] / block,
    }  # fmt: skip


def section_projection(ctx: Context) -> dict[str, Any]:
    """Projected speedups at every block-loop B, from that B's costs and the CPU block efficiencies."""
    loop = ctx.results.get("block_loop", {}).get("result", {}).get("batches", {})
    measured = {b: row for b, row in loop.items() if "costs" in row}
    if not measured:
        raise RuntimeError("no forward costs: the block_loop section did not finish any batch")
    records = json.loads(ctx.bench_report.read_text())["results"]
    methods = [r for r in records if r.get("draft_forwards") and r.get("n", NUM_DRAFTS) in (1, NUM_DRAFTS)]
    batches = {}
    for batch, row in measured.items():
        batches[batch] = [project_method(r, row["costs"], row["overhead_s_per_block"]) for r in methods]
    return {
        "ok": True,
        "label": "PROJECTED, not measured: device forward costs and package overhead from the block loop "
        "(random weights), block efficiencies measured on the CPU with the real pair",
        "source": str(ctx.bench_report),
        "batches": batches,
    }


# ----------------------------------------------------------------------------------------------------------------
# Runner

#: (name, function, optional, seconds it needs to start): an optional section starts only with that much left.
SECTIONS: tuple[tuple[str, Callable[[Context], dict[str, Any]], bool, float], ...] = (
    ("pytest", section_pytest, False, 0.0),
    ("agreement", section_agreement, False, 0.0),
    ("verify_timing", section_verify_timing, True, 0.0),
    ("profile", section_profile, True, 0.05),
    ("block_loop", section_block_loop, True, 0.5),
    ("projection", section_projection, True, 0.0),
)


def run_section(name: str, function: Callable[[Context], dict[str, Any]], ctx: Context) -> dict[str, Any]:
    """Run one section; an exception becomes its recorded error (with the traceback's last lines)."""
    start = time.perf_counter()
    print(f"== {name} ({ctx.budget.remaining():.0f} s left)", flush=True)
    try:
        result = function(ctx)
        entry = {"status": "ok" if result.pop("ok", True) else "failed", "result": result}
    except Exception as error:
        entry = {"status": "error", "error": error_text(error), "traceback": traceback.format_exc()[-3000:]}
        if ctx.device.type == "cuda":
            torch.cuda.empty_cache()
    entry["seconds"] = time.perf_counter() - start
    return entry


def metadata(ctx: Context, quick: bool) -> dict[str, Any]:
    import transformers

    meta: dict[str, Any] = {
        "device": str(ctx.device), "quick": quick, "budget_s": ctx.budget.total_s, "python": platform.python_version(),
        "platform": platform.platform(), "torch": torch.__version__, "transformers": transformers.__version__,
        "threads": torch.get_num_threads(), "sizes": dataclasses.asdict(ctx.sizes),
        "verifiers": verifiers.available(), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }  # fmt: skip
    if ctx.device.type == "cuda":
        meta.update(device_name=torch.cuda.get_device_name(ctx.device), cuda=torch.version.cuda)
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=10)
        meta["commit"] = head.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        meta["commit"] = None
    return meta


def write_json(path: Path, report: dict[str, Any]) -> None:
    """Write to a temporary name and rename, so a run cut short leaves the last complete report."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(json.dumps(report, indent=1, default=str))
    temporary.replace(path)


def run(ctx: Context, json_path: Path, quick: bool) -> dict[str, Any]:
    """Every section in order; the JSON is rewritten after each one."""
    report: dict[str, Any] = {"meta": metadata(ctx, quick), "sections": ctx.results}
    for name, function, optional, needs in SECTIONS:
        if optional and ctx.budget.remaining() < needs * ctx.sizes.reserve_s:
            ctx.results[name] = {"status": "skipped", "error": "time budget", "seconds": 0.0}
        else:
            ctx.results[name] = run_section(name, function, ctx)
        report["meta"]["elapsed_s"] = ctx.budget.elapsed()
        write_json(json_path, report)
    return report


# ----------------------------------------------------------------------------------------------------------------
# Table


def _section_line(name: str, entry: dict[str, Any]) -> str:
    """One line per section: status, seconds and its headline numbers."""
    result = entry.get("result", {})
    detail = entry.get("error", "")
    if name == "pytest" and "counts" in result:
        detail = ", ".join(f"{v} {k}" for k, v in result["counts"].items()) or result.get("error", "")
    elif name == "agreement" and result:
        detail = f"max |Δ| {result['max_abs_diff']:.2e} over {len(result['rows'])} pairs (tol {result['tolerance']:g})"
    elif name == "verify_timing" and result:
        skipped = sum("skipped" in row for row in result["rows"])
        detail = f"{result['timed']} timed, {skipped} skipped, {result['errors']} errors"
    elif name == "profile" and result:
        detail = (f"{result['kernel_launches_per_call']:.0f} launches, {result['aten_ops_per_call']:.0f} ops, "
                  f"{result['synchronize_count_per_call']:.0f} syncs per call")  # fmt: skip
    elif name == "block_loop" and result:
        detail = f"built in {result['build_s']:.1f} s, B = {', '.join(result['batches'])}"
    elif name == "projection" and result:
        detail = "projected speedups (not measured)"
    return f"{name:<14} {entry['status']:<8} {entry.get('seconds', 0.0):7.1f} s  {detail}"


def _timing_lines(result: dict[str, Any]) -> list[str]:
    lines = [f"{'verifier':<28} {'B':>3} {'support':>7} {'median ms':>10} {'reads':>6} {'syncs':>6} {'peak MiB':>9}"]
    for row in result.get("rows", []):
        head = f"{row['verifier']:<28} {row['batch']:>3} {row['support']:>7}"
        if "median_ms" not in row:
            lines.append(f"{head}  {row.get('skipped') or row.get('error', '')}"[:160])
            continue
        syncs = "-" if row["sync_warnings"] is None else str(row["sync_warnings"])
        peak = "-" if row["peak_memory_mib"] is None else f"{row['peak_memory_mib']:.1f}"
        lines.append(f"{head} {row['median_ms']:10.3f} {row['host_reads']:>6} {syncs:>6} {peak:>9}")
    return lines


def _loop_lines(loop: dict[str, Any], projection: dict[str, Any]) -> list[str]:
    lines = []
    for batch, row in loop.get("batches", {}).items():
        if "timings" not in row:
            lines.append(f"block loop B={batch}: {row.get('skipped') or row.get('error')}")
            continue
        phases = ", ".join(f"{k} {v:.3f}" for k, v in row["timings"].items())
        lines.append(f"block loop B={batch}: {row['tokens_per_s']:.1f} tok/s, {row['blocks']} blocks; s: {phases}")
        costs = row.get("costs", {})
        lines.append(f"  target forward s by new tokens {costs.get('target_forward_s')}")
        lines.append(f"  draft step s by tokens per row {costs.get('draft_step_s')}")
    for batch, rows in projection.get("batches", {}).items():
        for row in rows:
            lines.append(f"PROJECTED B={batch} {row['method']:<56} {row['projected_speedup']:5.2f}x")
    return lines


def print_table(report: dict[str, Any]) -> None:
    sections = report["sections"]
    print(f"\n{'section':<14} {'status':<8} {'time':>9}  details")
    for name, entry in sections.items():
        print(_section_line(name, entry))
    print()
    print("\n".join(_timing_lines(sections.get("verify_timing", {}).get("result", {}))))
    loop = sections.get("block_loop", {}).get("result", {})
    print("\n".join(_loop_lines(loop, sections.get("projection", {}).get("result", {}))))


# ----------------------------------------------------------------------------------------------------------------
# Command line


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", type=Path, default=ROOT / "eval" / "reports" / "device" / "device_check.json")
    parser.add_argument("--device", default="cuda", help="cuda (real sizes) or cpu (every step on tiny sizes)")
    parser.add_argument("--quick", action="store_true", help="fewer repeats, B ∈ {1, 64}, shorter generations")
    parser.add_argument("--budget", type=float, default=None, help="seconds for the whole run (450; 120 on a CPU)")
    parser.add_argument("--pytest-args", default=DEFAULT_PYTEST_ARGS, help="arguments of the pytest section")
    parser.add_argument("--bench-report", type=Path, default=BENCH_REPORT, help="CPU block efficiencies (JSON)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Run every section, write the JSON, print the table; exit status 1 when a section did not pass."""
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but torch sees no CUDA device; pass --device cpu for the tiny CPU run")
        return 2
    if device.type not in ("cuda", "cpu"):
        print(f"error: --device {args.device} is not supported: pass cuda or cpu")
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    budget = Budget(args.budget if args.budget is not None else (450.0 if device.type == "cuda" else 120.0))
    ctx = Context(device, sizes_for(device, args.quick), budget, args.pytest_args, args.bench_report.resolve())
    report = run(ctx, args.json, args.quick)
    print_table(report)
    print(f"\nwrote {args.json} ({budget.elapsed():.0f} s)")
    return 0 if all(entry["status"] == "ok" for entry in report["sections"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
