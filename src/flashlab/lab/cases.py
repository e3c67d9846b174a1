"""What the lab measures: the case dataclass, sweeps, the seed study preset and suite files.

A :class:`Case` is one attention problem (shapes, dtype, mask, scope). Providers and modes are
not part of it: a result row is provider × case × mode. Bad shapes raise :class:`LabError`
with one line naming the problem.
"""

from __future__ import annotations

import itertools
from dataclasses import asdict, dataclass, field
from typing import Any

from flashlab.lab import features
from flashlab.lab.errors import LabError

DTYPES = ("fp16", "bf16", "fp32")
SCOPES = ("op", "layer")
MAX_HEAD_DIM = 256


def _positive(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise LabError(f"{name} must be a positive integer, got {value!r}")
    return value


@dataclass(frozen=True, order=True)
class Case:
    """One attention problem. ``seqlen_k`` and ``kv_heads`` default to ``seqlen_q`` and ``heads``.

    ``scope="op"`` times the attention operation on q, k, v; ``scope="layer"`` times a full
    multi-head attention layer (QKV projection, attention, output projection) on x of shape
    (batch, seqlen, embed), self-attention only.

    Features (scope "op", self-attention; semantics in features.py): ``mask`` ("window:W",
    "document:N", "prefix:P"), ``softcap``, ``alibi``, ``varlen`` (> 0: a packed batch of
    ``batch`` sequences of lengths varlen … seqlen) and ``dropout`` (the attention dropout rate).
    """

    batch: int
    seqlen_q: int
    heads: int
    head_dim: int
    causal: bool = False
    dtype: str = "fp16"
    scope: str = "op"
    seqlen_k: int = 0
    kv_heads: int = 0
    mask: str = ""
    softcap: float = 0.0
    alibi: bool = False
    varlen: int = 0
    dropout: float = 0.0

    def __post_init__(self) -> None:
        for name in ("batch", "seqlen_q", "heads", "head_dim"):
            _positive(name, getattr(self, name))
        if self.seqlen_k == 0:
            object.__setattr__(self, "seqlen_k", self.seqlen_q)
        if self.kv_heads == 0:
            object.__setattr__(self, "kv_heads", self.heads)
        _positive("seqlen_k", self.seqlen_k)
        _positive("kv_heads", self.kv_heads)
        if self.head_dim > MAX_HEAD_DIM:
            raise LabError(f"head dim {self.head_dim} is larger than {MAX_HEAD_DIM} (heads {self.heads}, "
                           f"embedding {self.embed})")
        if self.heads % self.kv_heads:
            raise LabError(f"kv heads {self.kv_heads} do not divide heads {self.heads}")
        if self.dtype not in DTYPES:
            raise LabError(f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.scope not in SCOPES:
            raise LabError(f"scope must be one of {', '.join(SCOPES)}, got {self.scope!r}")
        if not isinstance(self.causal, bool):
            raise LabError(f"causal must be true or false, got {self.causal!r}")
        if self.scope == "layer" and self.seqlen_k != self.seqlen_q:
            raise LabError("scope 'layer' is self-attention: seqlen_k must equal seqlen")
        features.validate(self)

    @property
    def embed(self) -> int:
        """The model (embedding) dimension, heads × head_dim."""
        return self.heads * self.head_dim

    @property
    def label(self) -> str:
        """A readable id, e.g. ``B32-S1024-H32-D64-fp16-causal``."""
        s = f"S{self.seqlen_q}" if self.seqlen_k == self.seqlen_q else f"S{self.seqlen_q}x{self.seqlen_k}"
        h = f"H{self.heads}" if self.kv_heads == self.heads else f"H{self.heads}:{self.kv_heads}"
        parts = [f"B{self.batch}", s, h, f"D{self.head_dim}", self.dtype]
        if self.causal:
            parts.append("causal")
        parts += features.label_suffix(self)
        if self.scope != "op":
            parts.append(self.scope)
        return "-".join(parts)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Case:
        names = cls.__dataclass_fields__.keys()
        return cls(**{k: d[k] for k in names if k in d})


def case_from_embed(batch: int, seqlen: int, heads: int, embed: int, **kw: Any) -> Case:
    """A case given the embedding instead of the head dim; heads must divide the embedding."""
    _positive("heads", heads)
    _positive("embedding", embed)
    if embed % heads:
        raise LabError(f"heads {heads} do not divide the embedding {embed}")
    return Case(batch=batch, seqlen_q=seqlen, heads=heads, head_dim=embed // heads, **kw)


# ----------------------------------------------------------------------------------------------
# Sweeps: the cartesian product of lists, shared by `flashlab bench` flags and suite files.

SWEEP_KEYS = ("batch", "tokens", "seqlen", "seqlen_k", "heads", "kv_heads", "head_dim", "embed", "causal",
              "dtype", "scope", "mask", "softcap", "alibi", "varlen", "dropout")


def _as_list(key: str, value: Any) -> list[Any]:
    values = value if isinstance(value, (list, tuple)) else [value]
    if not values:
        raise LabError(f"{key} must not be an empty list")
    return list(values)


def expand_sweep(spec: dict[str, Any], *, where: str = "sweep") -> list[Case]:
    """All cases of one sweep: every combination of the listed values.

    Exactly one of ``batch`` / ``tokens`` (batch = tokens / seqlen); two or three of ``heads``,
    ``head_dim``, ``embed`` (consistent); ``seqlen`` required; the rest optional.
    """
    unknown = sorted(set(spec) - set(SWEEP_KEYS))
    if unknown:
        raise LabError(f"{where}: unknown key {unknown[0]!r} (known: {', '.join(SWEEP_KEYS)})")
    if ("batch" in spec) == ("tokens" in spec):
        raise LabError(f"{where}: give exactly one of 'batch' or 'tokens'")
    if "seqlen" not in spec:
        raise LabError(f"{where}: 'seqlen' is required")
    if sum(k in spec for k in ("heads", "head_dim", "embed")) < 2:
        raise LabError(f"{where}: give two of 'heads', 'head_dim', 'embed'")
    lists = {k: _as_list(k, v) for k, v in spec.items()}
    lists.setdefault("causal", [False])
    lists.setdefault("dtype", ["fp16"])
    lists.setdefault("scope", ["op"])
    keys = sorted(lists)
    cases: list[Case] = []
    for combo in itertools.product(*(lists[k] for k in keys)):
        cases.append(_one_case(dict(zip(keys, combo)), where))
    return list(dict.fromkeys(cases))


def _one_case(p: dict[str, Any], where: str) -> Case:
    seqlen = _positive("seqlen", p["seqlen"])
    if "tokens" in p:
        tokens = _positive("tokens", p["tokens"])
        if tokens % seqlen:
            raise LabError(f"{where}: tokens {tokens} is not a multiple of seqlen {seqlen}")
        batch = tokens // seqlen
    else:
        batch = _positive("batch", p["batch"])
    heads, head_dim, embed = p.get("heads"), p.get("head_dim"), p.get("embed")
    if embed is not None:
        _positive("embedding", embed)
        if heads is None:
            _positive("head_dim", head_dim)
            if embed % head_dim:
                raise LabError(f"{where}: head dim {head_dim} does not divide the embedding {embed}")
            heads = embed // head_dim
        elif embed % _positive("heads", heads):
            raise LabError(f"{where}: heads {heads} do not divide the embedding {embed}")
        elif head_dim is not None and heads * head_dim != embed:
            raise LabError(f"{where}: heads {heads} × head dim {head_dim} != embedding {embed}")
        head_dim = embed // heads
    extra = {k: p[k] for k in ("causal", "dtype", "scope", "kv_heads", "mask", "softcap", "alibi", "varlen", "dropout")
             if k in p}
    if "seqlen_k" in p:
        extra["seqlen_k"] = p["seqlen_k"]
    return Case(batch=batch, seqlen_q=seqlen, heads=heads, head_dim=head_dim, **extra)


# ----------------------------------------------------------------------------------------------
# The seed study (../shared/seed): a batch × seqlen grid and one-at-a-time sweeps.

@dataclass(frozen=True)
class Scale:
    """Sizes of the seed study at one scale."""

    name: str
    batches: tuple[int, ...]
    seqlens: tuple[int, ...]
    heads: int
    embed: int
    default_batch: int
    default_seqlen: int
    heads_sweep: tuple[int, ...]
    embed_sweep: tuple[int, ...]
    embed_sweep_heads: int
    dtype: str
    note: str


SCALES: dict[str, Scale] = {
    "full": Scale("full", (16, 32, 64), (512, 1024, 2048), 32, 2048, 32, 1024, (8, 16, 32), (1024, 2048, 4096),
                  16, "fp16", "the seed document's sizes"),
    "cpu": Scale("cpu", (1, 2, 4), (256, 512, 1024), 8, 512, 2, 512, (2, 4, 8), (256, 512, 1024), 4, "fp32",
                 "scaled down for a CPU: batch ÷16, seqlen ÷2, heads and embedding ÷4, fp32"),
    "tiny": Scale("tiny", (1, 2), (32, 64), 2, 32, 1, 32, (1, 2), (16, 32), 1, "fp32",
                  "tiny shapes for tests and smoke runs"),
}


@dataclass(frozen=True)
class Table:
    """One table of the seed document: a grid over (batch, seqlen) or a sweep of one parameter."""

    key: str
    title: str
    kind: str  # "grid" | "sweep"
    param: str  # the varied parameter ("batch", "seqlen", "heads", "embed", "causal"); "" for the grid
    scope: str
    cases: tuple[Case, ...]

    def to_dict(self) -> dict[str, Any]:
        return {"key": self.key, "title": self.title, "kind": self.kind, "param": self.param,
                "scope": self.scope, "cases": [c.to_dict() for c in self.cases]}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Table:
        return cls(d["key"], d["title"], d["kind"], d["param"], d["scope"],
                   tuple(Case.from_dict(c) for c in d["cases"]))


@dataclass(frozen=True)
class Study:
    """A named set of tables; its cases are the union of the tables' cases, in order."""

    name: str
    scale: Scale
    tables: tuple[Table, ...]
    defaults: dict[str, Any] = field(default_factory=dict)

    @property
    def cases(self) -> list[Case]:
        return list(dict.fromkeys(c for t in self.tables for c in t.cases))


def case_param(case: Case, param: str) -> Any:
    """The value of a table parameter for a case (``seqlen`` and ``embed`` included)."""
    if param == "seqlen":
        return case.seqlen_q
    return getattr(case, param)


def seed_study(scale: str = "full", scopes: tuple[str, ...] = ("op",), dtype: str | None = None) -> Study:
    """The seed document's experiments at ``scale`` ("full", "cpu" or "tiny") for each scope."""
    if scale not in SCALES:
        raise LabError(f"unknown scale {scale!r} (known: {', '.join(SCALES)})")
    sc = SCALES[scale]
    dt = dtype or sc.dtype
    tables: list[Table] = []
    for scope in scopes:
        def mk(batch: int = sc.default_batch, seqlen: int = sc.default_seqlen, heads: int = sc.heads,
               embed: int = sc.embed, causal: bool = False, scope: str = scope) -> Case:
            return case_from_embed(batch, seqlen, heads, embed, causal=causal, dtype=dt, scope=scope)

        sfx = "" if len(scopes) == 1 else f" ({scope})"
        tables += [
            Table(f"grid-{scope}", f"Batch × sequence length{sfx}", "grid", "", scope,
                  tuple(mk(batch=b, seqlen=s) for b in sc.batches for s in sc.seqlens)),
            Table(f"batch-{scope}", f"Batch size{sfx}", "sweep", "batch", scope,
                  tuple(mk(batch=b) for b in sc.batches)),
            Table(f"seqlen-{scope}", f"Sequence length{sfx}", "sweep", "seqlen", scope,
                  tuple(mk(seqlen=s) for s in sc.seqlens)),
            Table(f"heads-{scope}", f"Number of heads (embedding {sc.embed}){sfx}", "sweep", "heads", scope,
                  tuple(mk(heads=h) for h in sc.heads_sweep)),
            Table(f"embed-{scope}", f"Embedding dimension ({sc.embed_sweep_heads} heads){sfx}", "sweep", "embed",
                  scope, tuple(mk(heads=sc.embed_sweep_heads, embed=e) for e in sc.embed_sweep)),
            Table(f"causal-{scope}", f"Causal attention{sfx}", "sweep", "causal", scope,
                  tuple(mk(causal=c) for c in (False, True))),
        ]
    defaults = {"batch": sc.default_batch, "seqlen": sc.default_seqlen, "heads": sc.heads, "embed": sc.embed,
                "dtype": dt}
    return Study("seed", sc, tuple(tables), defaults)
