"""What the meta-step benchmark runs: one configuration (:class:`BenchConfig`), how long to time it
(:class:`Settings`) and the preset grids (:func:`make_grid`)."""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Sequence

from benchmarks.meta_step.machine import DTYPES
from benchmarks.meta_step.steps import MODES
from metarec import meta

LEARNER_NAMES = tuple(meta.LEARNERS)
PRESETS = ("quick", "default", "gpu")
DATA_SOURCES = ("synthetic", "ml-100k")


@dataclasses.dataclass(frozen=True)
class BenchConfig:
    """One benchmark configuration (a MeLU model on a meta-batch of tasks).

    ``support``/``query`` are the padded set sizes for synthetic data; for ``data="ml-100k"`` they
    are fixed by the protocol (support padded to 90, query 10) and the record reports the actual
    sizes. ``width`` is the size of both hidden MLP layers; ``chunk`` the ``chunk_size`` of the meta
    step (None = all tasks in one vmap); ``devices`` > 1 shards the task axis over a device mesh;
    ``dropout`` is MeLU's feature dropout during meta-training (0.1 as in the cold-start
    experiment; 0 runs the step without a PRNG key, which also compiles about twice as fast).
    ``n_items``: synthetic catalogue size (None: 400); mode ``sparse`` is the step with
    row-gathered embedding tables.
    """

    learner: str = "maml"
    data: str = "synthetic"
    meta_batch: int = 32
    support: int = 64
    query: int = 16
    inner_steps: int = 5
    width: int = 64
    embed_dim: int = 32
    remat: bool = False
    chunk: int | None = None
    dtype: str = "float32"
    modes: tuple[str, ...] = ("vmap",)
    devices: int = 1
    dropout: float = 0.1
    n_items: int | None = None
    section: str = "custom"

    def validate(self) -> None:
        """Raise ``ValueError`` naming the field and what is allowed."""
        if self.learner not in LEARNER_NAMES:
            raise ValueError(f"learner={self.learner!r}; allowed: {', '.join(LEARNER_NAMES)}")
        if self.data not in DATA_SOURCES:
            raise ValueError(f"data={self.data!r}; allowed: {', '.join(DATA_SOURCES)}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype={self.dtype!r}; allowed: {', '.join(DTYPES)}")
        bad = [m for m in self.modes if m not in MODES]
        if bad or not self.modes:
            allowed = ", ".join(MODES)
            raise ValueError(f"modes={self.modes!r}; allowed: non-empty subset of {allowed}")
        lower = dict(
            meta_batch=1, support=1, query=1, inner_steps=0, width=1, embed_dim=1, devices=1
        )
        for name, lo in lower.items():
            if getattr(self, name) < lo:
                raise ValueError(f"{name} must be >= {lo}, got {getattr(self, name)}")
        if self.chunk is not None and (self.chunk < 1 or self.meta_batch % self.chunk):
            raise ValueError(
                f"chunk={self.chunk} must be >= 1 and divide meta_batch={self.meta_batch}"
            )
        if self.meta_batch % self.devices:
            raise ValueError(
                f"meta_batch={self.meta_batch} must be divisible by devices={self.devices}"
            )
        if self.devices > 1 and not set(self.modes) <= {"vmap", "sparse"}:
            raise ValueError(
                "devices > 1 is only benchmarked for modes 'vmap' and 'sparse' (the sharded "
                "library step, dense or with row-gathered tables)"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.n_items is not None and (self.data != "synthetic" or self.n_items < 2):
            raise ValueError(f"n_items={self.n_items} needs data='synthetic' and >= 2 items")
        if self.remat and not meta.LEARNERS[self.learner].remat:
            raise ValueError(
                f"remat does not apply to {self.learner} (it never back-propagates through the "
                "inner loop)"
            )

    def short(self) -> str:
        """Compact label for tables."""
        s = (
            f"{self.learner} {self.data[:5]} T={self.meta_batch} S={self.support} "
            f"K={self.inner_steps} W={self.width}"
        )
        if self.remat:
            s += " remat"
        if self.chunk:
            s += f" chunk={self.chunk}"
        if self.dtype != "float32":
            s += f" {self.dtype}"
        if self.devices > 1:
            s += f" dev={self.devices}"
        if self.n_items:
            s += f" items={self.n_items}"
        return s

    def as_dict(self) -> dict:
        """The configuration as JSON-ready dict (``modes`` as a list)."""
        return dataclasses.asdict(self) | {"modes": list(self.modes)}


HEADLINE = dict(
    data="synthetic", meta_batch=32, support=64, query=16, inner_steps=5, width=64, embed_dim=32
)
SECTIONS = (
    "headline",
    "data",
    "meta_batch",
    "inner_steps",
    "support",
    "width",
    "chunk",
    "dtype",
    "tables",
    "ceiling",
)
#: the catalogue size of the large-catalogue comparison in section ``tables``
LARGE_CATALOGUE = 100_000
#: the large configuration of the peak-fraction target (MeLU with 512-wide hidden layers)
LARGE = dict(meta_batch=16, support=128, width=512, embed_dim=64)


@dataclasses.dataclass
class Settings:
    """How long to time each measurement, which matmul sizes to try, what to profile."""

    min_time: float = 1.0
    min_steps: int = 3
    matmul_sizes: tuple[int, ...] = (256, 512, 1024, 2048)
    matmul_min_time: float = 0.5
    memory_steps: tuple[int, ...] = (1, 5, 10, 20)
    memory_config: dict = dataclasses.field(
        default_factory=lambda: dict(meta_batch=32, support=64, query=16, width=64)
    )
    profile: bool = True
    seed: int = 0
    #: time the step's own matmul shapes (:mod:`benchmarks.meta_step.ceiling`) for the headline
    #: MAML records (sections ``headline`` and ``ceiling``), each shape for about this long
    ceiling: bool = True
    ceiling_min_time: float = 0.2
    #: record a configuration that runs out of device memory under ``failures`` and go on
    #: (the GPU preset's meta-batch scaling runs up to the memory limit); otherwise raise
    skip_out_of_memory: bool = False
    #: gather meta-batches on the device from a copy of the task pool there (an accelerator
    #: outruns the host's gather and copy at large meta-batches); the loop mode keeps host input
    device_input: bool = False
    #: seconds of warm-up steps after the first, before timing
    warmup_s: float = 0.0


def _quick_settings() -> Settings:
    return Settings(
        min_time=0.4,
        min_steps=2,
        matmul_sizes=(256, 512, 1024),
        matmul_min_time=0.2,
        memory_steps=(1, 4),
        memory_config=dict(meta_batch=8, support=32, query=8, width=64),
        ceiling_min_time=0.06,
    )


#: meta-batch sizes of the GPU preset's scaling section, up to one that runs out of an H200's
#: memory without remat and fits with it (BUILD_NOTES, "On a GPU")
GPU_META_BATCHES = (512, 4096, 32768, 65536, 131072)


def _gpu_settings() -> Settings:
    return Settings(
        min_time=0.5,
        min_steps=3,
        matmul_sizes=(2048, 4096, 8192),
        matmul_min_time=0.3,
        memory_steps=(1, 5, 20),
        # the ceiling times the step's own dot shapes on the CPU thread pool; the profile parser
        # reads CPU traces
        ceiling=False,
        profile=False,
        skip_out_of_memory=True,
        device_input=True,
        warmup_s=1.0,
    )


def _gpu_sections(learners: Sequence[str], sections: Sequence[str]) -> list[BenchConfig]:
    """The GPU preset, most wanted first: the headline MAML in all three executions, meta-batch
    scaling to the memory limit (the largest also with remat), the large configuration in f32 and
    bf16, the other learners at the headline configuration, 20 inner steps with/without remat."""

    def b(section, **kw):
        return BenchConfig(**(HEADLINE | kw), section=section)

    grid: list[BenchConfig] = []
    if "headline" in sections and "maml" in learners:
        grid.append(b("headline", learner="maml", modes=("vmap", "map", "loop")))
    if "meta_batch" in sections:
        grid += [b("meta_batch", learner="maml", meta_batch=t) for t in GPU_META_BATCHES]
        grid.append(b("meta_batch", learner="maml", meta_batch=GPU_META_BATCHES[-1], remat=True))
    if "width" in sections:
        grid.append(b("large", learner="maml", **LARGE))
        # the large configuration at a meta-batch that fills more of the GPU
        grid.append(b("large", learner="maml", **(LARGE | dict(meta_batch=256))))
    if "dtype" in sections:
        grid.append(b("dtype", learner="maml", **LARGE, dtype="bfloat16"))
    if "headline" in sections:
        grid += [b("headline", learner=name) for name in learners if name != "maml"]
    if "inner_steps" in sections:
        grid += [b("inner_steps", learner="maml", inner_steps=20, remat=r) for r in (False, True)]
    return grid


def _default_sections(learners: Sequence[str], sections: Sequence[str]) -> list[BenchConfig]:
    def b(section, **kw):
        return BenchConfig(**(HEADLINE | kw), section=section)

    three = ("vmap", "map", "loop")
    grid: list[BenchConfig] = []
    if "headline" in sections:
        grid += [b("headline", learner=name, modes=three) for name in learners]
    if "data" in sections:
        grid.append(b("data", learner="maml", data="ml-100k", modes=three))
    if "meta_batch" in sections:
        for t in (1, 8, 128, 512, 1024):
            modes = ("vmap", "map") if t <= 128 else ("vmap",)
            grid.append(b("meta_batch", learner="maml", meta_batch=t, modes=modes))
    if "inner_steps" in sections:
        grid += [b("inner_steps", learner="maml", inner_steps=20, remat=r) for r in (False, True)]
    if "support" in sections:
        grid += [b("support", learner="maml", support=s) for s in (16, 256)]
    if "width" in sections:
        grid += [b("width", learner="maml", width=256), b("large", learner="maml", **LARGE)]
    if "chunk" in sections:
        grid += [b("chunk", learner="maml", meta_batch=256, chunk=c) for c in (None, 64, 16)]
        # the headline meta-batch of 32 in cache-sized chunks
        grid += [b("chunk", learner="maml", chunk=c) for c in (8, 4)]
    if "dtype" in sections:
        grid += [
            b("dtype", learner="maml", dtype="bfloat16"),
            b("dtype", learner="maml", **LARGE, dtype="bfloat16"),
        ]
    if "tables" in sections:
        # dense vs row-gathered embedding tables: ml-100k (1682 items) and a 100k-item catalogue
        sparse = ("vmap", "sparse")
        grid += [
            b("tables", learner="maml", modes=sparse),
            b("tables", learner="maml", data="ml-100k", modes=sparse),
            b("tables", learner="maml", n_items=LARGE_CATALOGUE, modes=sparse),
        ]
    if "ceiling" in sections:
        # the headline MAML step in every library execution, each next to its matmul ceiling
        grid += [
            b("ceiling", learner="maml", modes=("vmap", "sparse", "map")),
            b("ceiling", learner="maml", chunk=8, modes=("vmap", "sparse")),
            b("ceiling", learner="maml", chunk=1, modes=("vmap", "sparse")),
        ]
    return grid


def make_grid(
    preset: str = "default",
    learners: Sequence[str] = LEARNER_NAMES,
    sections: Sequence[str] = SECTIONS,
    devices: int = 1,
    custom: dict | None = None,
) -> tuple[list[BenchConfig], Settings]:
    """The configurations of a preset (``quick`` ~1-2 min or ``default`` ~10 min on 2 CPU cores;
    ``gpu``: :func:`_gpu_sections`, about 3 min on one H200) and its :class:`Settings`.

    Sections: ``headline`` (every learner in ``learners`` at the headline configuration: MeLU,
    meta-batch 32, support 64, query 16, 5 inner steps; in all three modes), ``data`` (real
    ml-100k task batches), ``meta_batch`` (1..1024), ``inner_steps`` (timed with/without remat at
    20 steps), ``support``, ``width`` (including the large configuration used for the
    peak-fraction target), ``chunk`` (task chunking at meta-batch 256), ``dtype`` (bfloat16
    compute), ``tables`` (dense vs row-gathered embedding tables), ``ceiling`` (the headline MAML
    step in every library execution, unchunked / chunks of 8 / chunks of 1, dense and sparse
    tables, ``lax.map``, each with its matmul ceiling). The quick preset keeps only the headline
    MAML comparison. ``devices`` > 1 adds a ``devices`` section (sharded vmap step) and, with the
    ``ceiling`` section, the step sharded over the devices in chunks of 8 and 16, dense and
    sparse. ``custom``
    (a dict of lists: ``meta_batch``, ``support``, ``inner_steps``, ``width``, and scalars
    ``data``, ``modes``) adds the Cartesian product for every learner as section ``custom``.
    """
    if preset not in PRESETS:
        raise ValueError(f"preset={preset!r}; allowed: {', '.join(PRESETS)}")
    bad = [s for s in sections if s not in SECTIONS]
    if bad:
        raise ValueError(f"unknown sections {bad}; allowed: {', '.join(SECTIONS)}")
    bad = [name for name in learners if name not in LEARNER_NAMES]
    if bad or not learners:
        raise ValueError(f"unknown learners {bad}; allowed: {', '.join(LEARNER_NAMES)}")
    if preset == "quick":
        settings = _quick_settings()
        grid = []
        if "headline" in sections:
            modes = ("vmap", "map", "loop")
            grid.append(BenchConfig(**HEADLINE, learner="maml", modes=modes, section="headline"))
    elif preset == "gpu":
        settings = _gpu_settings()
        grid = _gpu_sections(learners, sections)
    else:
        settings = Settings()
        grid = _default_sections(learners, sections)
    if devices > 1:
        grid += [
            BenchConfig(**HEADLINE, learner="maml", devices=d, section="devices")
            for d in (1, devices)
        ]
        if "ceiling" in sections and preset == "default":
            # the same step on both cores at once: each device runs its slice of every chunk, with
            # dense and with row-gathered tables like the one-device rows
            grid += [
                BenchConfig(
                    **HEADLINE,
                    learner="maml",
                    chunk=c,
                    devices=devices,
                    modes=("vmap", "sparse"),
                    section="ceiling",
                )
                for c in (8, 16)
                if c % devices == 0
            ]
    if custom:
        keys = ("meta_batch", "support", "inner_steps", "width")
        lists = [list(custom.get(k) or [HEADLINE[k]]) for k in keys]
        modes = tuple(custom.get("modes") or ("vmap",))
        data = custom.get("data") or "synthetic"
        for name in learners:
            for values in itertools.product(*lists):
                kw = dict(zip(keys, values, strict=True), data=data, learner=name, modes=modes)
                grid.append(BenchConfig(**(HEADLINE | kw), section="custom"))
    for c in grid:
        c.validate()
    return grid, settings
