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

Every (dataset, temperature, method, prompt) result is a
:class:`~hf_globalres.eval.records.Record`, appended to
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
import logging
import os
import shutil
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import torch

from .. import verifiers
from ..devices import DTYPE_CHOICES
from ..generation.defaults import DEFAULT_ASSISTANT_TOP_K, DEFAULT_CONFIDENCE_THRESHOLD, DEFAULT_NUM_ASSISTANT_TOKENS
from . import datasets as prompt_sets
from . import fingerprint
from .metrics import DepthStats, extract_final_answer
from .records import (
    BASELINE_VERIFIER,
    FIRST_BRANCH_SINGLE,
    METHOD_KINDS,
    REFERENCE_VERIFIER,
    Grading,
    Method,
    MethodKind,
    Record,
    SameTreeCounts,
    Setting,
    Turn,
    as_record,
)


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
    on a CPU, the int8 draft for multi-draft runs; a draft with a shipped
    vocabulary ranking scores its first 32,768 tokens and each prompt's).
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
    #: Multi-draft runs use a copy of the draft whose LM head scores only part of the vocabulary and each
    #: prompt's tokens (:mod:`~hf_globalres.draft_vocab`): "auto" (the first
    #: :data:`~hf_globalres.draft_vocab.BUILTIN_RANKING_SIZE` ids of the draft's shipped ranking where it has
    #: one, else the whole vocabulary), "off", or a number of ids to keep.
    draft_vocab: str | int = "auto"
    #: The ranking ``draft_vocab`` keeps the first ids of (None: the one shipped for the draft).
    draft_vocab_ranking: str | None = None
    measure_acceptance: bool = True
    #: Runs of ``optimal`` (n ≥ 2) also score every rule of their draft scheme on their own trees.
    same_trees: bool = False
    #: The rules ``same_trees`` scores besides the run's own (None: every rule of the run's draft scheme).
    same_tree_rules: list[str] | None = None
    #: Options of named verifiers wherever the eval builds them (runs and same-tree scores), e.g.
    #: ``{"optimal_block": {"tilt": 30}}``.
    verifier_options: dict[str, dict[str, Any]] = field(default_factory=dict)

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
        "draft_vocab",
        "draft_vocab_ranking",
        "onednn_linear",
        "verifier_options",
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
        if self.draft_vocab not in ("auto", "off") and (
            isinstance(self.draft_vocab, bool) or not isinstance(self.draft_vocab, int) or self.draft_vocab < 1
        ):
            raise ValueError(f"draft_vocab must be auto, off or a number of token ids ≥ 1, got {self.draft_vocab!r}")
        if "multidraft" in self.methods:
            self.verifier_grid()
        if self.same_tree_rules is not None:
            self._check_same_tree_rules()
        self._check_verifier_options()

    def _check_verifier_options(self) -> None:
        if not isinstance(self.verifier_options, dict):
            raise ValueError(f"verifier_options must map verifier names to options, got {self.verifier_options!r}")
        for name, options in self.verifier_options.items():
            if name not in verifiers.available():
                raise ValueError(
                    f"verifier_options names unknown verifier {name!r}; available: {', '.join(verifiers.available())}"
                )
            if not isinstance(options, dict):
                raise ValueError(f"verifier_options[{name!r}] must be a mapping of options, got {options!r}")
            try:
                self.rule(name)
            except (TypeError, ValueError) as error:
                raise ValueError(f"verifier_options[{name!r}] = {options!r}: {error}") from None

    def rule(self, name: str) -> verifiers.Verifier:
        """The verifier ``name`` with its ``verifier_options``."""
        return verifiers.get(name, **self.verifier_options.get(name, {}))

    def _check_same_tree_rules(self) -> None:
        if not self.same_trees:
            raise ValueError("same_tree_rules chooses the rules same_trees scores; set same_trees too")
        # The runs that score trees are optimal's: a rule must read its i.i.d. drafts (or be single, on a branch).
        scheme = verifiers.get(REFERENCE_VERIFIER).draft_scheme
        fits = [
            name
            for name in verifiers.available()
            if name == BASELINE_VERIFIER or verifiers.get(name).draft_scheme == scheme
        ]
        if not self.same_tree_rules or any(name not in fits for name in self.same_tree_rules):
            raise ValueError(
                f"same_tree_rules must name rules that read {scheme} drafts, got {self.same_tree_rules!r}; "
                f"choose from: {', '.join(fits)}"
            )

    def draft_vocab_size(self) -> int | None:
        """How many ranked ids the multi-draft draft keeps (None: the whole vocabulary)."""
        from .. import draft_vocab

        if self.draft_vocab == "off":
            return None
        if self.draft_vocab == "auto":
            shipped = draft_vocab.builtin_ranking_path(str(self.draft)).is_file()
            return draft_vocab.BUILTIN_RANKING_SIZE if shipped or self.draft_vocab_ranking else None
        return int(self.draft_vocab)

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

    def append(self, record: Record | Mapping[str, Any]) -> None:
        """Write one record as one JSON line (a :class:`Record` in its :meth:`~Record.to_dict` form)."""
        data = record.to_dict() if isinstance(record, Record) else record
        line = json.dumps(data, separators=(",", ":")) + "\n"
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
        multidraft_draft: the draft multi-draft runs use (a copy with int8 layers with ``draft_int8``,
            over part of the vocabulary with ``draft_vocab``; default: ``draft``).
        dtype: the models' dtype; onednn_linear: their float32 linears run through oneDNN;
        packed_rows: the rows those linears' weights are laid out for (None: unpacked).
    """

    target: torch.nn.Module
    draft: torch.nn.Module
    tokenizer: Any
    device: torch.device
    multidraft_draft: torch.nn.Module | None = None
    dtype: torch.dtype = torch.float32
    onednn_linear: bool = False
    packed_rows: int | None = None

    @property
    def setting(self) -> Setting:
        """What ran, for records and reports: device, dtype, oneDNN linears and their packing."""
        dtype = str(self.dtype).removeprefix("torch.")
        return Setting(str(self.device), dtype, self.onednn_linear, self.packed_rows if self.onednn_linear else None)


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
    from .. import devices, draft_vocab, models

    dtype = devices.resolve_dtype(config.dtype, device)
    target = models.load_model(config.target, dtype=dtype, device_map=config.device_map)
    draft = models.load_model(config.draft, dtype=dtype)
    if config.device_map is None:
        target.to(device)
    draft.to(device)
    multidraft_draft = draft
    int8, vocab_size = _switched_on(config.draft_int8, when_auto=device.type == "cpu"), config.draft_vocab_size()
    if int8 or vocab_size is not None:
        multidraft_draft = copy.deepcopy(draft)
    if vocab_size is not None:
        ranking = draft_vocab.load_ranking(config.draft_vocab_ranking or str(config.draft))
        draft_vocab.restrict_vocabulary(multidraft_draft, ranking, vocab_size)
    if int8:
        devices.quantize_int8(multidraft_draft)
    onednn = _switched_on(config.onednn_linear, when_auto=device.type == "cpu" and dtype == torch.float32)
    if onednn:
        switched = [devices.use_onednn_linear(model, devices.PACK_ROWS) for model in {target, draft, multidraft_draft}]
        onednn = sum(switched) > 0
    tokenizer = models.load_tokenizer(config.target)
    packed_rows = devices.PACK_ROWS if onednn else None
    return Models(target.eval(), draft.eval(), tokenizer, device, multidraft_draft.eval(), dtype, onednn, packed_rows)


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
    scheme that takes n drafts (each for the run's draft shape,
    :meth:`~hf_globalres.verifiers.base.Verifier.for_shape`), and, for ``draft_shape="tree"``, ``single``
    on each tree's first branch (drafted exactly as an n = 1 chain).
    ``names`` keeps only those rules (``single`` on the first branch only if named); ``options``
    gives named rules their constructor options (:attr:`EvalConfig.verifier_options`).
    """

    def __init__(
        self,
        scheme: str,
        num_drafts: int,
        draft_shape: str,
        names: list[str] | None = None,
        options: dict[str, dict[str, Any]] | None = None,
    ) -> None:
        self.rules: dict[str, verifiers.Verifier] = {}
        for name in verifiers.available() if names is None else dict.fromkeys(names):
            rule = verifiers.get(name, **(options or {}).get(name, {})).for_shape(draft_shape)
            if rule.draft_scheme == scheme and (rule.max_drafts is None or rule.max_drafts >= num_drafts):
                self.rules[name] = rule
        self.first_branch = (
            verifiers.get(BASELINE_VERIFIER)
            if draft_shape == "tree"
            and BASELINE_VERIFIER in verifiers.available()
            and (names is None or BASELINE_VERIFIER in names)
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

    def counts(self) -> SameTreeCounts:
        return SameTreeCounts(self.blocks, dict(self.tokens))


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


@dataclass
class Generation:
    """One generation: its new token ids, its :class:`~.records.Turn` and what its callbacks measured."""

    new_ids: list[int]
    turn: Turn
    depth: DepthStats | None = None
    same_trees: SameTreeCounts | None = None


@dataclass
class _Measurements:
    """The measurement callbacks of one generation; the time spent in them is not the method's."""

    depth: DepthStats | None = None
    scores: SameTreeScores | None = None
    verification_callback: _Timed | None = None
    block_callback: _Timed | None = None

    @classmethod
    def for_method(cls, method: Method, config: EvalConfig) -> _Measurements:
        """Acceptance per depth for multi-draft runs, same-tree scores for the runs that score them."""
        out = cls()
        if method.kind == "multidraft" and config.measure_acceptance:
            out.depth = DepthStats(scheme=verifiers.get(method.verifier).draft_scheme)
            out.verification_callback = _Timed(out.depth.callback)
        if config.same_trees and method.scores_same_trees:
            scheme = verifiers.get(method.verifier).draft_scheme
            rules = None if config.same_tree_rules is None else [method.verifier, *config.same_tree_rules]
            out.scores = SameTreeScores(scheme, method.num_drafts, config.draft_shape, rules, config.verifier_options)
            out.block_callback = _Timed(out.scores)
        return out

    def exclude_from(self, seconds: float, timings: dict[str, float] | None) -> float:
        """``seconds`` (and ``timings["total"]``, in place) less the time spent in the callbacks."""
        for measurement in (self.verification_callback, self.block_callback):
            if measurement is not None:
                seconds -= measurement.seconds
                if timings is not None:
                    timings["total"] -= measurement.seconds
        return seconds


@dataclass
class _Decoded:
    """What one decoding call returned: the sequences and what multi-draft decoding reports about itself."""

    sequences: torch.Tensor
    timings: dict[str, float] | None = None
    reported_target_forwards: int | None = None
    accepted_lengths: list[int] | None = None


#: The message transformers' assisted generation logs on every run: its candidate generator calls the
#: assistant's ``generate`` with a ``generation_config`` beside ``min_new_tokens``/``max_new_tokens``
#: (transformers/generation/candidate_generator.py), whatever arguments the caller passes.
_ASSISTANT_CONFIG_WARNING = "Passing `generation_config` together with generation-related arguments"


class _DropAssistantConfigWarning(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(_ASSISTANT_CONFIG_WARNING)


@contextlib.contextmanager
def _without_assistant_config_warning() -> Iterator[None]:
    """Drop :data:`_ASSISTANT_CONFIG_WARNING` while transformers' assisted generation runs.

    The eval passes ``generate`` its settings as keyword arguments only; the message comes from
    transformers' own call of the assistant and says nothing about the run. Passing one
    ``GenerationConfig`` instead of the keyword arguments leaves it as it is (transformers 5.x).
    """
    logger = logging.getLogger("transformers.generation.utils")
    drop = _DropAssistantConfigWarning()
    logger.addFilter(drop)
    try:
        yield
    finally:
        logger.removeFilter(drop)


def _generate_kwargs(models: Models, input_ids: torch.Tensor, temperature: float, max_new_tokens: int) -> dict:
    """Keyword arguments of ``generate`` shared by every method: mask, length, padding, sampling."""
    eos = models.tokenizer.eos_token_id
    pad = models.tokenizer.pad_token_id if models.tokenizer.pad_token_id is not None else eos
    return {
        "attention_mask": torch.ones_like(input_ids),
        "max_new_tokens": max_new_tokens,
        "pad_token_id": pad,
        **_sampling_kwargs(temperature),
    }


def _decode_autoregressive(
    models: Models, method: Method, input_ids: torch.Tensor, kwargs: dict, config: EvalConfig, measure: _Measurements
) -> _Decoded:
    """Plain sampling from the target."""
    return _Decoded(models.target.generate(input_ids, **kwargs))


def _decode_assisted(
    models: Models, method: Method, input_ids: torch.Tensor, kwargs: dict, config: EvalConfig, measure: _Measurements
) -> _Decoded:
    """transformers' assisted generation: one draft of ``method.length`` tokens, read from the draft's config."""
    draft = models.draft
    draft.generation_config.num_assistant_tokens = method.length
    draft.generation_config.num_assistant_tokens_schedule = "constant"
    # transformers' own default τ is 0.4; 0 turns its confidence stop off, as None does for ours.
    draft.generation_config.assistant_confidence_threshold = config.assistant_confidence_threshold or 0.0
    with _without_assistant_config_warning():
        return _Decoded(models.target.generate(input_ids, assistant_model=draft, **kwargs))


def _decode_multidraft(
    models: Models, method: Method, input_ids: torch.Tensor, kwargs: dict, config: EvalConfig, measure: _Measurements
) -> _Decoded:
    """``hf_globalres.generate`` with the method's verifier, n and L, measured through its callbacks."""
    from .. import generation

    out = generation.generate(
        models.target,
        input_ids,
        assistant_model=models.multidraft_draft or models.draft,
        num_drafts=method.num_drafts,
        num_assistant_tokens=method.length,
        assistant_confidence_threshold=config.assistant_confidence_threshold,
        draft_shape=config.draft_shape,
        assistant_top_k=config.assistant_top_k,
        verifier=config.rule(method.verifier),
        tree_attention=config.tree_attention,
        verification_callback=measure.verification_callback,
        block_callback=measure.block_callback,
        return_dict_in_generate=True,
        **kwargs,
    )
    return _Decoded(out.sequences, dict(out.timings), int(out.target_forwards[0]), out.accepted_lengths[0])


#: One decoding function per method kind (:data:`~.records.METHOD_KINDS`).
_DECODERS: dict[MethodKind, Callable[..., _Decoded]] = {
    "autoregressive": _decode_autoregressive,
    "assisted": _decode_assisted,
    "multidraft": _decode_multidraft,
}


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _new_tokens(models: Models, sequences: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """The ids ``sequences[0]`` adds to ``input_ids``, up to and including the first stop token."""
    new = sequences[0, input_ids.shape[1] :]
    stops = torch.isin(new, torch.tensor(sorted(stop_ids(models)), dtype=new.dtype, device=new.device))
    if bool(stops.any()):
        # The stop token counts as generated; padding after it does not.
        new = new[: int(stops.nonzero()[0, 0]) + 1]
    return new


def generate_once(
    models: Models, method: Method, input_ids: torch.Tensor, temperature: float, max_new_tokens: int, config: EvalConfig
) -> Generation:
    """One generation with ``method``; returns its new token ids and its measurements.

    ``input_ids``: [1, T0]. Walltime excludes the acceptance bookkeeping of the
    verification callback and the same-tree scoring of the block callback.
    """
    kwargs = _generate_kwargs(models, input_ids, temperature, max_new_tokens)
    measure = _Measurements.for_method(method, config)
    counter = ForwardCounter(models.target)
    reset_peak_memory(models.device)
    try:
        _synchronize(models.device)
        start = time.perf_counter()
        decoded = _DECODERS[method.kind](models, method, input_ids, kwargs, config, measure)
        _synchronize(models.device)
        seconds = time.perf_counter() - start
    finally:
        counter.close()
    seconds = measure.exclude_from(seconds, decoded.timings)
    new = _new_tokens(models, decoded.sequences, input_ids)
    turn = Turn(
        new_tokens=int(new.numel()),
        target_forwards=counter.calls,
        seconds=seconds,
        timings=decoded.timings,
        peak_memory_gb=peak_memory_gb(models.device),
        reported_target_forwards=decoded.reported_target_forwards,
        accepted_lengths=decoded.accepted_lengths,
        prompt_tokens=int(input_ids.shape[1]),
    )
    same_trees = measure.scores.counts() if measure.scores is not None else None
    return Generation(new.tolist(), turn, measure.depth, same_trees)


def run_prompt(
    models: Models, method: Method, prompt: prompt_sets.Prompt, temperature: float, config: EvalConfig
) -> Record:
    """Every turn of ``prompt`` with ``method``; later turns follow the method's own earlier answers."""
    messages: list[dict[str, str]] = []
    turns: list[Turn] = []
    texts: list[str] = []
    depth, has_depth = DepthStats(), False
    same_trees: SameTreeCounts | None = None
    for index, user in enumerate(prompt.turns):
        messages.append({"role": "user", "content": user})
        ids = torch.tensor([prompt_sets.chat_ids(models.tokenizer, messages)], device=models.device)
        torch.manual_seed(prompt_seed(config.seed, prompt.uid, temperature, index))
        generated = generate_once(models, method, ids, temperature, config.max_new_tokens, config)
        text = models.tokenizer.decode(generated.new_ids, skip_special_tokens=True)
        messages.append({"role": "assistant", "content": text})
        texts.append(text)
        if generated.depth is not None:
            depth.merge(generated.depth)
            has_depth = True
        same_trees = generated.same_trees if same_trees is None else same_trees.plus(generated.same_trees)
        turns.append(generated.turn)
    grading = None
    if prompt.reference is not None:
        answer = extract_final_answer(texts[-1])
        grading = Grading(prompt.reference, answer, answer == prompt.reference)
    return Record.from_turns(
        key=record_key(prompt.dataset, temperature, method, prompt.uid),
        dataset=prompt.dataset,
        prompt=prompt.uid,
        category=prompt.category,
        temperature=temperature,
        method=method,
        setting=models.setting,
        turns=turns,
        texts=texts,
        depth=depth if has_depth else None,
        same_trees=same_trees,
        grading=grading,
    )


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
        _check_setting(store, models.setting)
        _warm_up(models, config)
        with _progress(len(todo), disable=not progress or rank != 0) as bar:
            for name, temperature, method, prompt in todo:
                bar.set_postfix_str(f"{name} T={temperature:g} {method.name}", refresh=False)
                store.append(run_prompt(models, method, prompt, temperature, config))
                bar.update()
    if state is not None:
        state.wait_for_everyone()
    return store.records()


def _check_setting(store: RecordStore, setting: Setting) -> None:
    """Raise ValueError when the run directory holds records made in another setting than ``setting``.

    The setting (device, dtype, kernels) is known once the models are loaded; records of different
    settings time different computations, so they are never mixed in one run directory.
    """
    recorded = {Setting.from_dict(record) for record in store.records()} - {Setting()}
    if recorded - {setting}:
        other = sorted(str(s.to_dict()) for s in recorded - {setting})
        raise ValueError(
            f"run directory {store.directory} holds results made in another setting ({'; '.join(other)}) than "
            f"this run's ({setting.to_dict()}); pass another --run-name, or --overwrite to discard them"
        )


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

#: What runs did before a setting existed: a run directory whose config lacks it ran that way.
_BEFORE_THE_SETTING = {"draft_int8": "off", "draft_vocab": "off", "draft_vocab_ranking": None, "verifier_options": {}}


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
        changed = [
            k for k in fields if previous.get(k, _BEFORE_THE_SETTING.get(k, getattr(defaults, k))) != getattr(config, k)
        ]
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


def resume_notes(config: EvalConfig, records: Iterable[Record | Mapping[str, Any]]) -> list[str]:
    """What a resumed run did not do that its settings might suggest (nothing is ever recomputed)."""
    typed = [as_record(r) for r in records]
    notes = []
    for dataset in config.datasets:
        prompts = {r.prompt for r in typed if r.dataset == dataset}
        if config.limit is not None and len(prompts) > config.limit:
            notes.append(
                f"the run directory holds {len(prompts)} {dataset} prompts and the report covers them all; "
                f"--limit {config.limit} drops no recorded result (pass another --run-name for a smaller run)"
            )
    scored = [r for r in typed if r.method.scores_same_trees]
    if config.same_trees and scored and not any(r.same_trees for r in scored):
        notes.append(
            "--same-trees scores trees as they are generated; these records were made without it and are not "
            "regenerated (pass another --run-name, or --overwrite, to score them)"
        )
    return notes


_AnyRecord = TypeVar("_AnyRecord", Record, Mapping[str, Any])


def select(records: Iterable[_AnyRecord], config: EvalConfig) -> list[_AnyRecord]:
    """Records that belong to ``config``'s grid (a run directory may hold more), in the form given."""
    names = {m.name for m in config.grid()}
    temps = {float(t) for t in config.temperatures}

    def belongs(record: Record) -> bool:
        return record.dataset in config.datasets and record.method.name in names and record.temperature in temps

    return [r for r in records if belongs(as_record(r))]


__all__ = [
    "BASELINE_VERIFIER",
    "FIRST_BRANCH_SINGLE",
    "METHOD_KINDS",
    "REFERENCE_VERIFIER",
    "EvalConfig",
    "ForwardCounter",
    "Generation",
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
