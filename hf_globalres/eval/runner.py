"""The evaluation loop: every method on the same prompts with the same seeds, one JSONL record per result.

Methods (:class:`Method`):

- ``autoregressive``: plain sampling from the target (``model.generate``);
- ``assisted``: transformers' own assisted generation, one draft of L tokens
  (batch 1, ``assistant_model=``, constant ``num_assistant_tokens``);
- ``multidraft``: ``hf_globalres.generate`` with a registered verifier, n
  drafts of L tokens; acceptance per depth and the theoretical optimum on the
  same positions are measured through ``verification_callback``. With
  ``same_trees`` the runs of ``optimal`` also score every other rule of their
  draft scheme on their own draft trees (:class:`SameTreeScores`).

Every (dataset, temperature, method, prompt) result is appended to
``<run dir>/records.<rank>.jsonl`` as soon as it is done, so a rerun skips
finished work; :class:`RecordStore` drops a torn last line left by an
interruption. Prompts are sharded across ``accelerate`` processes when the
suite runs under ``accelerate launch``; the main process writes the report
from every shard's records.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import hashlib
import json
import os
import shutil
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from .. import verifiers
from ..devices import DTYPE_CHOICES
from ..generation.defaults import DEFAULT_ASSISTANT_TOP_K, DEFAULT_CONFIDENCE_THRESHOLD, DEFAULT_NUM_ASSISTANT_TOKENS
from . import datasets as prompt_sets
from . import fingerprint
from .metrics import DepthStats, extract_final_answer

MethodKind = Literal["autoregressive", "assisted", "multidraft"]
METHOD_KINDS: tuple[MethodKind, ...] = ("autoregressive", "assisted", "multidraft")

#: The rule the suite's checks are about, and the single-draft rule it is measured against.
REFERENCE_VERIFIER = "optimal"
BASELINE_VERIFIER = "single"
#: The ``same_trees`` entry of ``single`` scored on each tree's first branch (a chain drafted as n = 1).
FIRST_BRANCH_SINGLE = "single (first branch)"


@dataclass(frozen=True)
class Method:
    """One decoding method of the grid.

    Attributes:
        kind: "autoregressive", "assisted" or "multidraft".
        verifier: registered verifier name (multidraft only).
        num_drafts: n (1 for assisted, 0 for autoregressive).
        length: L, draft tokens per block (0 for autoregressive).
    """

    kind: MethodKind
    verifier: str | None = None
    num_drafts: int = 0
    length: int = 0

    @property
    def name(self) -> str:
        if self.kind == "autoregressive":
            return "autoregressive"
        if self.kind == "assisted":
            return f"hf-assisted L={self.length}"
        return f"{self.verifier} n={self.num_drafts} L={self.length}"


def default_verifiers() -> list[str]:
    """Single-draft at n = 1 against SpecTr and (once registered) the optimal rule at n = 4."""
    return ["single", "spectr:4"] + (["optimal:4"] if "optimal" in verifiers.available() else [])


@dataclass
class EvalConfig:
    """Everything a run depends on. The defaults are the README main job.

    The default grid is sized for a 2-core CPU: a handful of GSM8K prompts and
    short generations over autoregressive sampling, transformers' assisted
    generation and the multi-draft verifiers at n = 1 and 4, in the fastest
    measured setting (``generate``'s drafting defaults: L ≤ 12 with a
    confidence stop at 0.4 for every drafting method, top-64 draft laws and,
    on a CPU, the int8 draft for multi-draft runs).
    """

    target: str = "qwen2.5-coder-1.5b-instruct"
    draft: str = "qwen2.5-coder-0.5b-instruct"
    datasets: list[str] = field(default_factory=lambda: ["gsm8k"])
    gsm8k_path: str | None = None
    mtbench_path: str | None = None
    limit: int | None = 3
    max_new_tokens: int = 32
    temperatures: list[float] = field(default_factory=lambda: [1.0])
    methods: list[str] = field(default_factory=lambda: list(METHOD_KINDS))
    verifiers: list[str] = field(default_factory=lambda: default_verifiers())
    num_drafts: list[int] = field(default_factory=lambda: [1, 4])
    lengths: list[int] = field(default_factory=lambda: [DEFAULT_NUM_ASSISTANT_TOKENS])
    seed: int = 0
    output_dir: str = "eval/reports"
    run_name: str = "default"
    #: "auto": bfloat16 where the device computes it natively, else float32 (:func:`~hf_globalres.devices.auto_dtype`).
    dtype: str = "auto"
    #: Float32 CPU linears through oneDNN for every method (:func:`~hf_globalres.devices.use_onednn_linear`):
    #: "auto" (on for float32 on a CPU), "on" or "off".
    onednn_linear: str = "auto"
    device: str = "auto"
    device_map: str | None = None
    threads: int | None = None
    tree_attention: bool | str = "auto"
    #: τ for multi-draft decoding and transformers' assisted generation alike (None: fixed L for both).
    assistant_confidence_threshold: float | None = DEFAULT_CONFIDENCE_THRESHOLD
    draft_shape: str = "tree"
    #: Multi-draft runs draft from the draft law truncated to its top-k tokens (None: the whole law).
    assistant_top_k: int | None = DEFAULT_ASSISTANT_TOP_K
    #: Multi-draft runs use a copy of the draft with int8 linear layers (:func:`~hf_globalres.devices.quantize_int8`):
    #: "auto" (on a CPU), "on" or "off". transformers' assisted generation keeps the draft as loaded.
    draft_int8: str = "auto"
    measure_acceptance: bool = True
    #: Runs of ``optimal`` (n ≥ 2) also score every rule of their draft scheme on their own trees.
    same_trees: bool = False

    #: Fields that change results: a run directory refuses to resume under different values.
    RESULT_FIELDS = (
        "target",
        "draft",
        "gsm8k_path",
        "mtbench_path",
        "max_new_tokens",
        "seed",
        "dtype",
        "tree_attention",
        "assistant_confidence_threshold",
        "draft_shape",
        "assistant_top_k",
        "draft_int8",
        "onednn_linear",
    )

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> EvalConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown config keys: {', '.join(unknown)}; known keys: {', '.join(sorted(known))}")
        return cls(**data)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def validate(self, *, datasets: bool = True) -> None:
        """Raise ValueError naming the first invalid setting (``datasets=False``: prompts come from the caller)."""
        for name in self.datasets if datasets else []:
            if name not in prompt_sets.LOADERS:
                raise ValueError(f"unknown dataset {name!r}; available: {', '.join(prompt_sets.LOADERS)}")
        for kind in self.methods:
            if kind not in METHOD_KINDS:
                raise ValueError(f"unknown method {kind!r}; available: {', '.join(METHOD_KINDS)}")
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"limit must be ≥ 1, got {self.limit}")
        check_run_name(self.run_name)
        if self.threads is not None and (isinstance(self.threads, bool) or self.threads < 1):
            raise ValueError(f"threads must be a whole number ≥ 1, got {self.threads}")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be ≥ 1, got {self.max_new_tokens}")
        if any(t < 0 for t in self.temperatures) or not self.temperatures:
            raise ValueError(
                f"temperatures must be a non-empty list of values ≥ 0 (0 = greedy), got {self.temperatures}"
            )
        if any(n < 1 for n in self.num_drafts) or any(L < 1 for L in self.lengths):
            raise ValueError("num_drafts and lengths must be ≥ 1")
        from ..generation.drafting import check_drafting_options

        check_drafting_options(self.assistant_confidence_threshold, self.draft_shape, self.assistant_top_k)
        if self.dtype not in DTYPE_CHOICES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPE_CHOICES)}, got {self.dtype!r}")
        for name in ("onednn_linear", "draft_int8"):
            if getattr(self, name) not in ("auto", "on", "off"):
                raise ValueError(f"{name} must be auto, on or off, got {getattr(self, name)!r}")
        if "multidraft" in self.methods:
            self.verifier_grid()

    def verifier_grid(self) -> list[tuple[str, list[int]]]:
        """``(verifier, [n, ...])`` pairs from ``verifiers`` entries.

        An entry is ``"name"`` (every n of ``num_drafts`` the rule can take),
        ``"name:n1,n2"`` (exactly those n) or ``"all"`` (every registered rule,
        like ``"name"``).
        """
        known = verifiers.available()
        out: list[tuple[str, list[int]]] = []
        for entry in self.verifiers:
            name, _, counts = entry.partition(":")
            names = known if name == "all" else [name]
            for rule_name in names:
                if rule_name not in known:
                    raise ValueError(f"unknown verifier {rule_name!r}; available: {', '.join(known)}")
                limit = verifiers.get(rule_name).max_drafts
                if counts:
                    try:
                        ns = [int(c) for c in counts.split(",")]
                    except ValueError:
                        raise ValueError(f"verifier entry {entry!r}: expected 'name:n1,n2,...'") from None
                    if any(n < 1 or (limit is not None and n > limit) for n in ns):
                        raise ValueError(f"verifier entry {entry!r}: {rule_name} takes 1..{limit or 'any'} drafts")
                else:
                    ns = [n for n in self.num_drafts if limit is None or n <= limit]
                out.append((rule_name, ns))
        return out

    def grid(self) -> list[Method]:
        """Methods of the run in a fixed order (autoregressive, assisted per L, then each verifier per L and n)."""
        out: list[Method] = []
        if "autoregressive" in self.methods:
            out.append(Method("autoregressive"))
        if "assisted" in self.methods:
            out += [Method("assisted", num_drafts=1, length=L) for L in self.lengths]
        if "multidraft" in self.methods:
            for name, ns in self.verifier_grid():
                out += [Method("multidraft", name, n, L) for L in self.lengths for n in ns]
        return list(dict.fromkeys(out))  # "all" may repeat a rule named on its own

    def run_dir(self) -> Path:
        return Path(self.output_dir) / self.run_name


def check_run_name(name: object) -> None:
    """Raise ValueError unless ``name`` is a plain directory name (no separators, not "", "." or "..")."""
    if not isinstance(name, str) or name in ("", ".", "..") or "/" in name or "\\" in name or name != name.strip():
        raise ValueError(
            f"run name must be a plain directory name (no '/' or '\\', not empty, '.' or '..'), got {name!r}"
        )


#: Written into every run directory when it is created; ``--overwrite`` deletes only directories holding it.
RUN_MANIFEST = "config.json"


def discard_run(run_dir: Path) -> None:
    """Delete the run directory ``run_dir`` (``--overwrite``); refuse anything that is not one.

    Raises:
        ValueError: ``run_dir`` exists but holds no :data:`RUN_MANIFEST`, or another run holds its lock.
    """
    if not run_dir.exists():
        return
    if not (run_dir / RUN_MANIFEST).is_file():
        raise ValueError(
            f"{run_dir} is not a run directory of hf-globalres-eval (no {RUN_MANIFEST}); refusing to delete it. "
            "Pass another --run-name or --output-dir"
        )
    with RunLock(run_dir):
        shutil.rmtree(run_dir)


class RunLock:
    """An exclusive lock on a run directory, so two runs of one run name never write it at once."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = Path(run_dir)
        self._handle: Any = None

    def __enter__(self) -> RunLock:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._handle = open(self.run_dir / ".lock", "a")
        try:
            import fcntl
        except ImportError:  # pragma: no cover - platforms without fcntl run unlocked
            return self
        try:
            fcntl.flock(self._handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self._handle.close()
            raise ValueError(
                f"another hf-globalres-eval run is writing to {self.run_dir}; wait for it to finish or pass another "
                "--run-name"
            ) from None
        return self

    def __exit__(self, *exc: object) -> None:
        self._handle.close()  # closing the file releases the lock


def record_key(dataset: str, temperature: float, method: Method, uid: str) -> str:
    return f"{dataset}|T={temperature:g}|{method.name}|{uid}"


def prompt_seed(seed: int, uid: str, temperature: float, turn: int) -> int:
    """Seed of one generation: equal for every method, different across prompts, temperatures and turns."""
    digest = hashlib.sha256(f"{seed}|{uid}|{temperature:g}|{turn}".encode()).digest()
    return int.from_bytes(digest[:8], "little") % (2**63)


def atomic_write(path: str | os.PathLike, data: str | bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file and a rename: readers see the old or the new file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(temporary, "wb") as handle:
        handle.write(data.encode() if isinstance(data, str) else data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)


class RecordStore:
    """Per-result JSONL files of one run directory (one file per process rank).

    Each record is one line written with a single ``write`` and flushed to
    disk, so an interruption can only tear the last line; opening the store
    cuts a torn tail off before appending.
    """

    def __init__(self, directory: str | os.PathLike, rank: int = 0) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.path = self.directory / f"records.{rank}.jsonl"
        self._repair(self.path)

    @staticmethod
    def _repair(path: Path) -> None:
        if not path.is_file():
            return
        data = path.read_bytes()
        cut = data.rfind(b"\n") + 1
        if cut != len(data):
            with open(path, "r+b") as handle:
                handle.truncate(cut)

    def records(self) -> list[dict[str, Any]]:
        """Every complete record of every rank, once per key (torn or unreadable lines are ignored).

        A key written twice (two processes racing past the run lock, or a copied records file)
        counts once: the first record kept, so a summary never double-counts a prompt.
        """
        out: dict[str, dict[str, Any]] = {}
        for path in sorted(self.directory.glob("records.*.jsonl")):
            for line in path.read_text(encoding="utf-8").splitlines():
                with contextlib.suppress(json.JSONDecodeError):
                    record = json.loads(line)
                    out.setdefault(record["key"], record)
        return list(out.values())

    def done(self) -> set[str]:
        return {record["key"] for record in self.records()}

    def append(self, record: dict[str, Any]) -> None:
        line = json.dumps(record, separators=(",", ":")) + "\n"
        with open(self.path, "ab") as handle:
            handle.write(line.encode())
            handle.flush()
            os.fsync(handle.fileno())


class ForwardCounter:
    """Counts calls of ``module.forward`` (target forwards, whatever the decoding method)."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.calls = 0
        self._handle = module.register_forward_pre_hook(self._hook)

    def _hook(self, *_: Any) -> None:
        self.calls += 1

    def close(self) -> None:
        self._handle.remove()


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    else:
        with contextlib.suppress(OSError):  # Linux: reset VmHWM to the current RSS
            Path("/proc/self/clear_refs").write_text("5")


def peak_memory_gb(device: torch.device) -> float | None:
    """Peak GPU memory allocated (CUDA) or peak resident set size (Linux CPU) since the last reset."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 2**20
    return None


@dataclass
class Models:
    """Target, draft and their shared tokenizer, on one device.

    Attributes:
        multidraft_draft: the draft multi-draft runs use (an int8 copy with ``draft_int8``;
            default: ``draft``).
        dtype: the models' dtype; onednn_linear: their float32 linears run through oneDNN.
    """

    target: torch.nn.Module
    draft: torch.nn.Module
    tokenizer: Any
    device: torch.device
    multidraft_draft: torch.nn.Module | None = None
    dtype: torch.dtype = torch.float32
    onednn_linear: bool = False

    @property
    def setting(self) -> dict[str, Any]:
        """What ran, for records and reports: device, dtype, oneDNN linears."""
        return {
            "device": str(self.device),
            "dtype": str(self.dtype).removeprefix("torch."),
            "onednn_linear": self.onednn_linear,
        }


def resolve_device(name: str) -> torch.device:
    """The device named by ``--device`` ("auto": CUDA when available, else the CPU)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"unknown device {name!r}; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} asked for, but this torch build sees no CUDA device; use --device cpu")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ValueError(f"device {name!r} does not exist: {torch.cuda.device_count()} CUDA device(s) found")
    return device


def _switched_on(setting: str, *, when_auto: bool) -> bool:
    """An "auto" / "on" / "off" setting's value, "auto" meaning ``when_auto``."""
    return setting == "on" or (setting == "auto" and when_auto)


def load_models(config: EvalConfig, device: torch.device) -> Models:
    """Load the configured pair (built-in names, directories, .gguf files or Hub ids)."""
    from .. import devices, models

    dtype = devices.resolve_dtype(config.dtype, device)
    target = models.load_model(config.target, dtype=dtype, device_map=config.device_map)
    draft = models.load_model(config.draft, dtype=dtype)
    if config.device_map is None:
        target.to(device)
    draft.to(device)
    multidraft_draft = draft
    if _switched_on(config.draft_int8, when_auto=device.type == "cpu"):
        multidraft_draft = copy.deepcopy(draft)
        devices.quantize_int8(multidraft_draft)
    onednn = _switched_on(config.onednn_linear, when_auto=device.type == "cpu" and dtype == torch.float32)
    if onednn:
        onednn = sum(devices.use_onednn_linear(model) for model in {target, draft, multidraft_draft}) > 0
    tokenizer = models.load_tokenizer(config.target)
    return Models(target.eval(), draft.eval(), tokenizer, device, multidraft_draft.eval(), dtype, onednn)


class _Timed:
    """Wraps a measurement callback and accumulates the seconds spent in it (excluded from walltime)."""

    def __init__(self, callback: Any) -> None:
        self.callback = callback
        self.seconds = 0.0

    def __call__(self, *args: Any) -> None:
        start = time.perf_counter()
        self.callback(*args)
        self.seconds += time.perf_counter() - start


class SameTreeScores:
    """``block_callback`` that scores several rules on each block's own draft tree.

    For every block it adds each rule's exact expected tokens per block on
    that tree (:func:`~hf_globalres.generation.loop.expected_block_tokens`),
    so rules compare on the same drafts and q with their own sampling noise
    integrated out. The rules are every registered rule of the run's draft
    scheme that takes n drafts, and, for ``draft_shape="tree"``, ``single``
    on each tree's first branch (drafted exactly as an n = 1 chain).
    """

    def __init__(self, scheme: str, num_drafts: int, draft_shape: str) -> None:
        self.rules: dict[str, verifiers.Verifier] = {}
        for name in verifiers.available():
            rule = verifiers.get(name)
            if rule.draft_scheme == scheme and (rule.max_drafts is None or rule.max_drafts >= num_drafts):
                self.rules[name] = rule
        self.first_branch = (
            verifiers.get(BASELINE_VERIFIER)
            if draft_shape == "tree" and BASELINE_VERIFIER in verifiers.available()
            else None
        )
        self.blocks = 0
        self.tokens: dict[str, float] = {name: 0.0 for name in self.rules}
        if self.first_branch is not None:
            self.tokens[FIRST_BRANCH_SINGLE] = 0.0

    def __call__(self, tree: Any) -> None:
        from ..generation.loop import expected_block_tokens

        self.blocks += int(tree.tokens.shape[0])
        for name, rule in self.rules.items():
            self.tokens[name] += float(expected_block_tokens(tree, rule).sum())
        if self.first_branch is not None:
            chain = expected_block_tokens(tree.first_branch(), self.first_branch)
            self.tokens[FIRST_BRANCH_SINGLE] += float(chain.sum())

    def to_dict(self) -> dict[str, Any]:
        return {"blocks": self.blocks, "tokens": dict(self.tokens)}


def stop_ids(models: Models) -> set[int]:
    """End-of-sequence ids of the tokenizer and the target's generation config."""
    ids = models.tokenizer.eos_token_id
    configured = getattr(models.target.generation_config, "eos_token_id", None)
    out = set()
    for value in (ids, configured):
        if isinstance(value, int):
            out.add(value)
        elif value is not None:
            out.update(int(v) for v in value)
    return out


def _sampling_kwargs(temperature: float) -> dict[str, Any]:
    # Full-distribution sampling: no top-k/top-p truncation unless a model's config adds one.
    if temperature == 0:
        return {"do_sample": False, "top_k": None, "top_p": None, "temperature": None}
    return {"do_sample": True, "temperature": temperature, "top_k": 0, "top_p": 1.0}


def generate_once(
    models: Models, method: Method, input_ids: torch.Tensor, temperature: float, max_new_tokens: int, config: EvalConfig
) -> dict[str, Any]:
    """One generation with ``method``; returns new token ids and its measurements.

    ``input_ids``: [1, T0]. Walltime excludes the acceptance bookkeeping of the
    verification callback.
    """
    from .. import generation

    target, draft = models.target, models.draft
    eos = models.tokenizer.eos_token_id
    pad = models.tokenizer.pad_token_id if models.tokenizer.pad_token_id is not None else eos
    kwargs: dict[str, Any] = {
        "attention_mask": torch.ones_like(input_ids),
        "max_new_tokens": max_new_tokens,
        "pad_token_id": pad,
        **_sampling_kwargs(temperature),
    }
    stats, callback, scores, block_callback = None, None, None, None
    if method.kind == "multidraft" and config.measure_acceptance:
        stats = DepthStats(scheme=verifiers.get(method.verifier).draft_scheme)
        callback = _Timed(stats.callback)
    scored_run = method.kind == "multidraft" and method.verifier == REFERENCE_VERIFIER and method.num_drafts > 1
    if config.same_trees and scored_run:
        scores = SameTreeScores(verifiers.get(method.verifier).draft_scheme, method.num_drafts, config.draft_shape)
        block_callback = _Timed(scores)
    counter = ForwardCounter(target)
    reset_peak_memory(models.device)
    out_timings, reported = None, {}
    try:
        if models.device.type == "cuda":
            torch.cuda.synchronize(models.device)
        start = time.perf_counter()
        if method.kind == "autoregressive":
            sequences = target.generate(input_ids, **kwargs)
        elif method.kind == "assisted":
            draft.generation_config.num_assistant_tokens = method.length
            draft.generation_config.num_assistant_tokens_schedule = "constant"
            # transformers' own default τ is 0.4; 0 turns its confidence stop off, as None does for ours.
            draft.generation_config.assistant_confidence_threshold = config.assistant_confidence_threshold or 0.0
            sequences = target.generate(input_ids, assistant_model=draft, **kwargs)
        else:
            out = generation.generate(
                target,
                input_ids,
                assistant_model=models.multidraft_draft or draft,
                num_drafts=method.num_drafts,
                num_assistant_tokens=method.length,
                assistant_confidence_threshold=config.assistant_confidence_threshold,
                draft_shape=config.draft_shape,
                assistant_top_k=config.assistant_top_k,
                verifier=method.verifier,
                tree_attention=config.tree_attention,
                verification_callback=callback,
                block_callback=block_callback,
                return_dict_in_generate=True,
                **kwargs,
            )
            sequences, out_timings = out.sequences, dict(out.timings)
            reported = {
                "reported_target_forwards": int(out.target_forwards[0]),
                "accepted_lengths": out.accepted_lengths[0],
            }
        if models.device.type == "cuda":
            torch.cuda.synchronize(models.device)
        seconds = time.perf_counter() - start
    finally:
        counter.close()
    for measurement in (callback, block_callback):
        if measurement is not None:
            seconds -= measurement.seconds
            if out_timings is not None:
                out_timings["total"] -= measurement.seconds
    new = sequences[0, input_ids.shape[1] :]
    stops = torch.isin(new, torch.tensor(sorted(stop_ids(models)), dtype=new.dtype, device=new.device))
    if bool(stops.any()):
        # The stop token counts as generated; padding after it does not.
        new = new[: int(stops.nonzero()[0, 0]) + 1]
    return {
        "new_ids": new.tolist(),
        "new_tokens": int(new.numel()),
        "target_forwards": counter.calls,
        "seconds": seconds,
        "timings": out_timings,
        "depth": stats.to_dict() if stats is not None else None,
        "same_trees": scores.to_dict() if scores is not None else None,
        "peak_memory_gb": peak_memory_gb(models.device),
        **reported,
    }


def run_prompt(
    models: Models, method: Method, prompt: prompt_sets.Prompt, temperature: float, config: EvalConfig
) -> dict[str, Any]:
    """Every turn of ``prompt`` with ``method``; later turns follow the method's own earlier answers."""
    messages: list[dict[str, str]] = []
    turns, texts = [], []
    depth = DepthStats()
    has_depth = False
    same_trees: dict[str, Any] | None = None
    for turn, user in enumerate(prompt.turns):
        messages.append({"role": "user", "content": user})
        ids = torch.tensor([prompt_sets.chat_ids(models.tokenizer, messages)], device=models.device)
        torch.manual_seed(prompt_seed(config.seed, prompt.uid, temperature, turn))
        result = generate_once(models, method, ids, temperature, config.max_new_tokens, config)
        text = models.tokenizer.decode(result.pop("new_ids"), skip_special_tokens=True)
        messages.append({"role": "assistant", "content": text})
        texts.append(text)
        if result["depth"] is not None:
            depth.merge(result["depth"])
            has_depth = True
        result.pop("depth")
        same_trees = merge_same_trees(same_trees, result.pop("same_trees"))
        result["prompt_tokens"] = int(ids.shape[1])
        turns.append(result)
    timings = [t["timings"] for t in turns if t["timings"]]
    record: dict[str, Any] = {
        "key": record_key(prompt.dataset, temperature, method, prompt.uid),
        "dataset": prompt.dataset,
        "prompt": prompt.uid,
        "category": prompt.category,
        "temperature": temperature,
        "method": method.name,
        "kind": method.kind,
        "verifier": method.verifier,
        "num_drafts": method.num_drafts,
        "length": method.length,
        **models.setting,
        "new_tokens": sum(t["new_tokens"] for t in turns),
        "target_forwards": sum(t["target_forwards"] for t in turns),
        "seconds": sum(t["seconds"] for t in turns),
        "verifier_seconds": sum(t["verifier"] for t in timings) if timings else None,
        "peak_memory_gb": max((t["peak_memory_gb"] or 0.0) for t in turns) or None,
        "turns": turns,
        "texts": texts,
        "depth": depth.to_dict() if has_depth else None,
        "same_trees": same_trees,
    }
    if prompt.reference is not None:
        answer = extract_final_answer(texts[-1])
        record.update(reference=prompt.reference, answer=answer, correct=answer == prompt.reference)
    return record


def merge_same_trees(total: dict[str, Any] | None, part: dict[str, Any] | None) -> dict[str, Any] | None:
    """Sum two :meth:`SameTreeScores.to_dict` results (None counts as nothing)."""
    if total is None or part is None:
        return total if part is None else {"blocks": part["blocks"], "tokens": dict(part["tokens"])}
    tokens = dict(total["tokens"])
    for name, value in part["tokens"].items():
        tokens[name] = tokens.get(name, 0.0) + value
    return {"blocks": total["blocks"] + part["blocks"], "tokens": tokens}


def _progress(total: int, disable: bool) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="evaluating", unit="gen", disable=disable, dynamic_ncols=True)


@contextlib.contextmanager
def _distributed(device: str) -> Iterator[Any]:
    """accelerate's process state when available (rank, world size, barrier), else a single process."""
    try:
        from accelerate import PartialState
    except ImportError:  # pragma: no cover - accelerate is part of the eval extra
        yield None
        return
    # CPU processes (torchrun / accelerate launch --cpu) need cpu=True to join one gloo group.
    yield PartialState(cpu=device == "cpu" or (device == "auto" and not torch.cuda.is_available()))


def run(
    config: EvalConfig,
    models: Models | None = None,
    *,
    progress: bool = True,
    prompts: dict[str, list[prompt_sets.Prompt]] | None = None,
    overwrite: bool = False,
) -> list[dict[str, Any]]:
    """Run the grid, appending one record per (dataset, temperature, method, prompt); return all records.

    Finished records in the run directory are kept and skipped. Under
    ``accelerate launch`` each process takes every world-th prompt and the
    call returns the records of all processes after a barrier.

    Args:
        config: the run.
        models: preloaded models (default: load ``config.target``/``config.draft``).
        progress: show a progress bar.
        prompts: prompts per dataset name, e.g. your own (default: load ``config.datasets``).
        overwrite: discard the run directory's earlier results first, once every input has been
            checked (only a directory this suite created, see :func:`discard_run`).
    """
    config.validate(datasets=prompts is None)
    if config.threads:
        torch.set_num_threads(config.threads)
    run_dir = config.run_dir()
    with _distributed(config.device) as state:
        rank = state.process_index if state is not None else 0
        world = state.num_processes if state is not None else 1
        device = state.device if state is not None and world > 1 else resolve_device(config.device)
        if prompts is None:
            paths = {"gsm8k": config.gsm8k_path, "mtbench": config.mtbench_path}
            prompts = {name: prompt_sets.load_prompts(name, paths[name], config.limit) for name in config.datasets}
        check_models(config)
        if rank == 0 and overwrite:
            discard_run(run_dir)
        # One process holds the lock; the ranks of one sharded run write the directory together.
        with RunLock(run_dir) if world == 1 else contextlib.nullcontext():
            if rank == 0:
                _check_resumable(run_dir, config, prompts)
            if state is not None:
                state.wait_for_everyone()
            return _run_grid(config, models, prompts, device, state, RecordStore(run_dir, rank), progress)


def check_models(config: EvalConfig) -> None:
    """Raise ValueError naming a target or draft that cannot be found, before anything is written."""
    from .. import models

    for spec in (config.target, config.draft):
        if spec in models.BUILTIN:
            models.source_files(models.BUILTIN[spec])
        else:
            models.resolve(spec)


def _run_grid(
    config: EvalConfig,
    models: Models | None,
    prompts: dict[str, list[prompt_sets.Prompt]],
    device: torch.device,
    state: Any,
    store: RecordStore,
    progress: bool,
) -> list[dict[str, Any]]:
    """The body of :func:`run`: every missing (dataset, temperature, method, prompt) record, then all records."""
    rank = state.process_index if state is not None else 0
    world = state.num_processes if state is not None else 1
    done = store.done()
    todo = [
        (name, temperature, method, prompt)
        for name in prompts
        for temperature in config.temperatures
        for index, prompt in enumerate(prompts[name])
        if index % world == rank
        # Methods interleave per prompt so that load changes hit every method alike.
        for method in config.grid()
        if record_key(name, temperature, method, prompt.uid) not in done
    ]
    if todo:
        models = models if models is not None else load_models(config, device)
        _warm_up(models, config)
        with _progress(len(todo), disable=not progress or rank != 0) as bar:
            for name, temperature, method, prompt in todo:
                bar.set_postfix_str(f"{name} T={temperature:g} {method.name}", refresh=False)
                store.append(run_prompt(models, method, prompt, temperature, config))
                bar.update()
    if state is not None:
        state.wait_for_everyone()
    return store.records()


def _warm_up(models: Models, config: EvalConfig) -> None:
    """One short generation per method kind, so one-time initialisation is not timed."""
    ids = torch.tensor(
        [prompt_sets.chat_ids(models.tokenizer, [{"role": "user", "content": "Hi"}])], device=models.device
    )
    seen: set[str] = set()
    for method in config.grid():
        if method.kind not in seen:
            seen.add(method.kind)
            generate_once(models, method, ids, 1.0, 2, dataclasses.replace(config, measure_acceptance=False))


#: Settings whose values name files: compared by the content they name (:mod:`.fingerprint`), not as text.
_NAMED_BY_PATH = ("target", "draft", "gsm8k_path", "mtbench_path")


def _check_resumable(run_dir: Path, config: EvalConfig, prompts: dict[str, list[prompt_sets.Prompt]]) -> None:
    """Write the run's config and fingerprint, or check that the run directory's results match them.

    Raises:
        ValueError: naming each setting, model or prompt that differs from the recorded run.
    """
    path = run_dir / RUN_MANIFEST
    current = fingerprint.run_fingerprint(config, prompts)
    merged = config.to_dict()
    if path.is_file():
        previous = json.loads(path.read_text())
        defaults = EvalConfig()
        recorded = previous.get("fingerprint")
        fields = [k for k in EvalConfig.RESULT_FIELDS if recorded is None or k not in _NAMED_BY_PATH]
        changed = [k for k in fields if previous.get(k, getattr(defaults, k)) != getattr(config, k)]
        if recorded is not None:
            changed += fingerprint.differences(recorded, current)
        if changed:
            raise ValueError(
                f"run directory {run_dir} holds results made with different {', '.join(changed)}; "
                "pass another --run-name, or --overwrite to discard them and start afresh"
            )
        # The grid may grow between runs: keep the union so the report covers everything recorded.
        for key in ("datasets", "temperatures", "methods", "verifiers", "num_drafts", "lengths"):
            merged[key] = list(dict.fromkeys(list(previous.get(key, [])) + list(merged[key])))
        current["prompts"] = {**(recorded or {}).get("prompts", {}), **current["prompts"]}
    atomic_write(path, json.dumps({**merged, "fingerprint": current}, indent=2))


def resume_notes(config: EvalConfig, records: list[dict[str, Any]]) -> list[str]:
    """What a resumed run did not do that its settings might suggest (nothing is ever recomputed)."""
    notes = []
    for dataset in config.datasets:
        prompts = {r["prompt"] for r in records if r["dataset"] == dataset}
        if config.limit is not None and len(prompts) > config.limit:
            notes.append(
                f"the run directory holds {len(prompts)} {dataset} prompts and the report covers them all; "
                f"--limit {config.limit} drops no recorded result (pass another --run-name for a smaller run)"
            )
    scored = [r for r in records if r["verifier"] == REFERENCE_VERIFIER and r["num_drafts"] > 1]
    if config.same_trees and scored and not any(r.get("same_trees") for r in scored):
        notes.append(
            "--same-trees scores trees as they are generated; these records were made without it and are not "
            "regenerated (pass another --run-name, or --overwrite, to score them)"
        )
    return notes


def select(records: Iterable[dict[str, Any]], config: EvalConfig) -> list[dict[str, Any]]:
    """Records that belong to ``config``'s grid (a run directory may hold more)."""
    names = {m.name for m in config.grid()}
    temps = {float(t) for t in config.temperatures}
    return [
        r for r in records if r["dataset"] in config.datasets and r["method"] in names and r["temperature"] in temps
    ]


__all__ = [
    "METHOD_KINDS",
    "EvalConfig",
    "ForwardCounter",
    "Method",
    "Models",
    "RecordStore",
    "atomic_write",
    "generate_once",
    "load_models",
    "prompt_seed",
    "record_key",
    "resume_notes",
    "run",
    "run_prompt",
    "select",
]
