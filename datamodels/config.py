"""Run configuration: one frozen dataclass per stage, composed into :class:`RunConfig`.

YAML in, validated before anything is written: an unknown key, a wrong type, a non-finite
number (``.nan``, ``.inf``) or an out-of-range value raises
:class:`~datamodels.errors.ConfigError` naming the file, the key, the expected and the actual
value. The file itself must be a UTF-8 text file holding a non-empty mapping with no key twice
(a duplicated key or section is refused naming both lines, never silently merged); numbers
like ``1e-3`` are floats (YAML 1.2), not strings. The dataclass defaults *are* the embedded digits default
(``pipelines/digits.yaml`` spells them out).

Range metadata on a field: ``_range(lo, hi, lo_open=False, hi_open=False)``; ``None`` means
unbounded. ``_choice(...)`` restricts a string field to a set of values.
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from datamodels.errors import ConfigError

__all__ = [
    "DataConfig",
    "ModelConfig",
    "TrainConfig",
    "CollectConfig",
    "FitConfig",
    "EvalConfig",
    "BrittlenessConfig",
    "VerifyConfig",
    "LabelIssuesConfig",
    "ResourcesConfig",
    "RunConfig",
    "load_config",
    "config_from_dict",
    "apply_overrides",
    "training_identity",
    "diff_identity",
]


def _range(lo=None, hi=None, *, lo_open=False, hi_open=False, help=""):
    return {"range": (lo, hi, lo_open, hi_open), "help": help}


def _choice(*values, help=""):
    return {"choices": values, "help": help}


def _help(text):
    return {"help": text}


@dataclass(frozen=True)
class DataConfig:
    """Which dataset, and how it is split. Images are uint8 (N, C, H, W)."""

    dataset: str = field(
        default="digits",
        metadata=_choice("digits", "cifar10", "fashion-mnist", "mnist", "npz", "synthetic", help="dataset name"),
    )
    root: str | None = field(
        default=None,
        metadata=_help("where the data is: cifar10: directory of data_batch_1..5 and test_batch (python version); "
                       "fashion-mnist, mnist: directory of the four IDX files (train-images-idx3-ubyte[.gz], "
                       "train-labels-idx1-ubyte[.gz], t10k-...; null for fashion-mnist: "
                       "/usr/share/datasets/fashion-mnist); npz: the .npz file (x_train, y_train, x_test, y_test)"),
    )
    train_size: int | None = field(
        default=1000,
        metadata=_range(2, None, help="digits: training examples N of the seeded split (the other images are the "
                                      "targets); cifar10, fashion-mnist, mnist, npz: a seeded subset of N of the "
                                      "training images (null: all of them)"),
    )
    split_seed: int = field(default=0, metadata=_range(0, None, help="seed of the digits split and of the "
                                                                     "train_size/test_size subsets"))
    synthetic_train: int = field(
        default=50000, metadata=_range(2, None, help="synthetic: training examples N")
    )
    synthetic_test: int = field(
        default=10000, metadata=_range(1, None, help="synthetic: targets T")
    )
    beton: str | None = field(
        default=None,
        metadata=_help("train.loader=ffcv: path of the training set's .beton (written if missing)"),
    )
    # -- subsets, layout and flips (fashion-mnist, mnist, npz) --
    test_size: int | None = field(
        default=None,
        metadata=_range(1, None, help="a seeded subset of T of the test images as targets (null: all of them); "
                                      "not for synthetic"),
    )
    layout: str = field(
        default="auto",
        metadata=_choice("auto", "nchw", "nhwc", help="npz: axis order of 4-D image arrays (auto: the axis of at "
                                                      "most 4 channels; 3-D arrays are grey N, H, W)"),
    )
    flippable: bool | None = field(
        default=None,
        metadata=_help("whether width flips keep the labels (train.flip and train.tta_flip act only then): null = "
                       "the dataset's own answer (cifar10, fashion-mnist, synthetic: yes; digits, mnist, npz: no)"),
    )
    label_noise: float = field(
        default=0.0, metadata=_range(0, 1, hi_open=True,
                                     help="share of the labels of data.label_noise_split replaced by another class "
                                          "when the dataset loads (exactly round(share n), seeded by "
                                          "data.split_seed): the given labels every model trains and is scored on; "
                                          "a known answer for `datamodels label-issues`"))
    label_noise_split: str = field(
        default="test", metadata=_choice("train", "test", "both", help="which labels data.label_noise replaces"))


@dataclass(frozen=True)
class ModelConfig:
    """ResNet-9 (prep conv, three stages with pooling, residual blocks after stages 1 and 3)."""

    widths: tuple[int, int, int, int] = field(
        default=(16, 32, 64, 128),
        metadata=_help("channels of prep, stage 1, 2, 3; (64, 128, 256, 512) is the full ResNet-9"),
    )
    scale_out: float = field(
        default=0.125, metadata=_range(0, None, lo_open=True, help="multiplier on the logits")
    )


@dataclass(frozen=True)
class TrainConfig:
    """The training recipe of one model on its subset."""

    epochs: int = field(default=10, metadata=_range(1, None))
    batch_size: int = field(default=64, metadata=_range(1, None))
    lr: float = field(default=0.4, metadata=_range(0, None, lo_open=True, help="peak learning rate (SGD, nesterov)"))
    momentum: float = field(default=0.9, metadata=_range(0, 1, hi_open=True))
    weight_decay: float = field(default=5e-4, metadata=_range(0, None))
    label_smoothing: float = field(default=0.0, metadata=_range(0, 1, hi_open=True))
    warmup: float = field(
        default=0.25,
        metadata=_range(0, 1, help="fraction of training at which the triangular lr schedule peaks"),
    )
    translate: int = field(default=1, metadata=_range(0, None, help="random translation, pixels"))
    flip: bool = field(default=False, metadata=_help("random horizontal (width) flips"))
    cutout: int = field(default=0, metadata=_range(0, None, help="cutout square size, pixels (0 = off)"))
    tta_flip: bool = field(
        default=False, metadata=_help("average logits of the image and its width-flipped copy")
    )
    device: str = field(default="cpu", metadata=_choice("cpu", "cuda", "auto"))
    precision: str = field(default="float32", metadata=_choice("float32", "bf16", "fp16"))
    threads: int = field(default=1, metadata=_range(1, None, help="torch threads per worker"))
    label_corruption: float = field(
        default=0.0, metadata=_range(0, 1, hi_open=True,
                                     help="share of the N training labels replaced by a different, uniformly "
                                          "drawn class: exactly round(share N) of them, drawn from the run seed"))
    input_noise: float = field(
        default=0.0, metadata=_range(0, None, help="std of Gaussian noise added to each normalised training "
                                                   "input (units of the channel std); a teacher sees the clean "
                                                   "input (soft randomization)"))
    distill_weight: float = field(
        default=0.5, metadata=_range(0, 1, help="with a teacher: share of the loss that is the distillation term"))
    distill_temperature: float = field(
        default=4.0, metadata=_range(0, None, lo_open=True, help="with a teacher: softmax temperature"))
    teacher_dropout: float = field(
        default=0.0, metadata=_range(0, 1, hi_open=True,
                                     help="with a teacher: dropout kept on in the teacher's penultimate layer "
                                          "while it teaches (a fickle teacher)"))
    loader: str = field(
        default="memory",
        metadata=_choice("memory", "ffcv", help="memory: whole dataset on the device as uint8; "
                                                "ffcv: an FFCV Loader over data.beton (extra datamodels[ffcv])"),
    )


@dataclass(frozen=True)
class CollectConfig:
    """How many models, on which subsets."""

    alpha: float = field(
        default=0.5, metadata=_range(0, 1, lo_open=True, help="subset fraction: each mask has round(alpha*N) ones")
    )
    models: int = field(default=1000, metadata=_range(1, None, help="models M to train"))
    block_size: int = field(
        default=8,
        metadata=_range(1, None, help="models per work unit; also the row chunk of the store"),
    )
    logit_models: int = field(
        default=100,
        metadata=_range(0, None, help="models 0..M'-1 also record their logits on every training and test "
                                      "example (float16, (N + T) K each), for out-of-sample class probabilities "
                                      "(`datamodels label-issues`); raising it later trains only those models "
                                      "again and adds just their logits"),
    )


@dataclass(frozen=True)
class FitConfig:
    """Linear datamodels (N, T) + bias per target, by one of several estimators (docs/estimators.md)."""

    estimator: str = field(
        default="lasso", metadata=_choice("lasso", "ridge", "trak", "trak-ridge",
                                          help="lasso/ridge on masks, TRAK from gradients, or ridge on "
                                               "masks shrunk towards TRAK"))
    targets: str = field(
        default="test", metadata=_choice("test", "test+train", help="fit test targets, or training examples too")
    )
    n_lambdas: int = field(default=40, metadata=_range(2, None, help="lambdas on the geometric path"))
    eps: float = field(default=1e-3, metadata=_range(0, 1, lo_open=True, hi_open=True,
                                                      help="path ends at lam_max * eps"))
    val_fraction: float = field(default=0.1, metadata=_range(0, 1, lo_open=True, hi_open=True,
                                                             help="share of models held out to choose lambda"))
    backend: str = field(default="torch", metadata=_choice("torch", "sklearn"))
    device: str = field(default="auto", metadata=_choice("cpu", "cuda", "auto"))
    dtype: str = field(default="float32", metadata=_choice("float32", "float64"))
    block_rows: int = field(default=4096, metadata=_range(1, None, help="mask rows streamed per block"))
    tol: float = field(default=1e-6, metadata=_range(0, None, lo_open=True, help="solver tolerance"))
    patience: int | None = field(
        default=5, metadata=_range(1, None, help="end a target's path after this many lambdas without a "
                                                 "better validation MSE (null: whole path)"))
    min_models: int = field(default=20, metadata=_range(4, None, help="complete models needed to fit"))
    ridge_grid: int = field(default=25, metadata=_range(2, None, help="ridge penalties tried per target "
                                                                      "(geometric, chosen on held-out models)"))
    trak_models: int = field(default=8, metadata=_range(1, None, help="models featurised for TRAK (table trak/pP)"))
    trak_dim: int = field(default=512, metadata=_range(8, None, help="projection dimension P of the per-example "
                                                                     "gradients (keep P < N)"))
    trak_ridge: float = field(default=3.0, metadata=_range(0, None, lo_open=True,
                                                            help="ridge term of the TRAK kernel, relative to "
                                                                 "trace(Phi^T Phi) / P"))


@dataclass(frozen=True)
class EvalConfig:
    """Held-out evaluation models for the LDS: E fresh masks, each trained R times."""

    masks: int = field(default=50, metadata=_range(2, None, help="evaluation masks E"))
    repeats: int = field(default=2, metadata=_range(1, None, help="models R per mask (>= 2 gives a noise ceiling)"))


@dataclass(frozen=True)
class BrittlenessConfig:
    """Estimated removal/flip set sizes from the datamodels."""

    thresholds: tuple[float, ...] = field(
        default=(0.0, -0.5, -1.0, -2.0),
        metadata=_range(None, 0, help="margin thresholds C <= 0: smallest k with predicted margin <= C"),
    )
    full_models: int = field(default=8, metadata=_range(1, None, help="models trained on the full set (baseline margin)"))
    flip_label: str = field(default="runner-up", metadata=_choice("runner-up", "random", "fixed"))
    flip_class: int = field(default=0, metadata=_range(0, None, help="new label when flip_label=fixed"))
    flip_effect: float = field(
        default=2.0,
        metadata=_range(0, None, lo_open=True, help="predicted effect of flipping an example, in units of "
                                                    "removing it (2: it stops supporting and starts opposing)"),
    )
    max_k: int | None = field(default=None, metadata=_range(1, None, help="largest set size considered (default N)"))


@dataclass(frozen=True)
class VerifyConfig:
    """Verified brittleness: grow-then-bisect searches of k by retraining (docs/brittleness.md)."""

    models: int = field(default=2, metadata=_range(1, None, help="models K trained per check"))
    targets: int = field(default=3, metadata=_range(0, None, help="targets the main job searches (sampled "
                                                                  "among those classified correctly)"))
    rounds: int = field(default=5, metadata=_range(1, None, help="checks per search at most"))
    method: str = field(
        default="datamodel",
        metadata=_help("ranking of `datamodels verify` and the main job: datamodel (the current fit), a fit's "
                       "name, representation, pixel or random"))
    methods: tuple[str, ...] = field(
        default=("fits", "representation", "pixel", "random"),
        metadata=_help("rankings `datamodels brittleness --verify` compares (fits: every stored fit)"))
    modes: tuple[str, ...] = field(default=("remove", "flip"), metadata=_choice("remove", "flip"))
    start_k: int = field(default=8, metadata=_range(1, None, help="first k of a ranking without an estimate"))
    tolerance: float = field(
        default=0.25, metadata=_range(0, 1, hi_open=True, help="bisection ends when the gap is <= max(1, "
                                                              "tolerance * k) (0: the exact smallest k)"))
    max_k: int | None = field(default=None, metadata=_range(1, None, help="largest k a search tries "
                                                                          "(default N // 2)"))


@dataclass(frozen=True)
class LabelIssuesConfig:
    """Label errors by confident learning on the run's out-of-sample probabilities (docs/label_issues.md)."""

    filter_by: str = field(
        default="prune_by_noise_rate",
        metadata=_choice("prune_by_noise_rate", "prune_by_class", "both", "confident_learning",
                         "predicted_neq_given", help="cleanlab.filter.find_label_issues' filter_by"))
    supporters: int = field(
        default=5, metadata=_range(1, None, help="training examples shown per side (toward the given and toward "
                                                 "the suggested label) for each flagged example"))
    bench_arms: tuple[str, ...] = field(
        default=("model.widths=[8, 16, 32, 64]", "model.widths=[16, 32, 64, 128]"),
        metadata=_help("--benchmark: model configurations compared, each 'KEY=VALUE' or 'KEY=VALUE; KEY=VALUE' "
                       "of model.* and train.* keys"))
    bench_models: int = field(
        default=4, metadata=_range(1, None, help="--benchmark: full-set models trained per configuration"))


@dataclass(frozen=True)
class ResourcesConfig:
    """Where the work runs. None of this changes results, so it may differ between sessions."""

    executor: str = field(
        default="ray", metadata=_choice("ray", "local", help="ray: an actor pool (embedded Ray, or the cluster at "
                                                             "--address); local: this process, one model at a time"))
    workers: int | None = field(
        default=None, metadata=_range(1, None, help="most training actors at once (default: as many as the "
                                                    "cluster's resources allow; grows as nodes join)")
    )
    cpus_per_worker: float = field(default=1.0, metadata=_range(0, None, lo_open=True))
    gpus_per_worker: float = field(default=0.0, metadata=_range(0, 1, help="fractional GPUs per actor"))
    in_flight_per_worker: int = field(default=2, metadata=_range(1, None))
    max_retries: int = field(default=3, metadata=_range(0, None, help="retries of a block whose worker died"))
    wait_timeout: float = field(
        default=300.0, metadata=_range(0, None, lo_open=True,
                                       help="seconds with no worker able to run before giving up, naming the "
                                            "missing resources"))
    fit_on: str = field(
        default="auto", metadata=_choice("auto", "driver", "cluster",
                                         help="where fit runs: cluster = a Ray task with fit_cpus/fit_gpus/"
                                              "fit_memory_gb; auto = cluster when joined to one and the store is "
                                              "a URL, else the driver"))
    fit_cpus: float = field(default=1.0, metadata=_range(0, None, lo_open=True))
    fit_gpus: float = field(default=0.0, metadata=_range(0, None))
    fit_memory_gb: float | None = field(default=None, metadata=_range(0, None, lo_open=True))


@dataclass(frozen=True)
class RunConfig:
    """Everything a run needs. ``training_identity`` is the part that fixes masks and margins."""

    name: str = "digits"
    seed: int = field(default=0, metadata=_range(0, None, help="run seed: masks and training seeds derive from (seed, i)"))
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    collect: CollectConfig = field(default_factory=CollectConfig)
    fit: FitConfig = field(default_factory=FitConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    brittleness: BrittlenessConfig = field(default_factory=BrittlenessConfig)
    verify: VerifyConfig = field(default_factory=VerifyConfig)
    resources: ResourcesConfig = field(default_factory=ResourcesConfig)
    label_issues: LabelIssuesConfig = field(default_factory=LabelIssuesConfig)

    def to_dict(self) -> dict[str, Any]:
        return _to_plain(dataclasses.asdict(self))

    def replace(self, **sections) -> "RunConfig":
        return dataclasses.replace(self, **sections)


# Keys that may change between invocations on the same store without changing any result.
_NON_IDENTITY = {"collect.models", "collect.block_size", "collect.logit_models", "train.threads", "train.loader", "data.beton",
                 "resources", "name"}


def _to_plain(x):
    if isinstance(x, dict):
        return {k: _to_plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_to_plain(v) for v in x]
    return x


def _flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def training_identity(cfg: RunConfig | dict) -> dict[str, Any]:
    """Flattened config keys that determine masks and margins (everything but M and resources).

    Block size is excluded on purpose: it only sets the store's row chunking, which is fixed
    when the store is created.
    """
    d = cfg.to_dict() if isinstance(cfg, RunConfig) else cfg
    flat = _flatten(d)
    return {
        k: v
        for k, v in flat.items()
        if k not in _NON_IDENTITY and k.split(".")[0] not in _NON_IDENTITY
        and k.split(".")[0] in {"seed", "data", "model", "train", "collect"}
    }


def diff_identity(a: RunConfig | dict, b: RunConfig | dict) -> dict[str, tuple[Any, Any]]:
    """Keys of the training identity whose values differ: {key: (a's, b's)}."""
    ia, ib = training_identity(a), training_identity(b)
    return {k: (ia.get(k), ib.get(k)) for k in sorted(set(ia) | set(ib)) if ia.get(k) != ib.get(k)}


# --------------------------------------------------------------------------- validation


def _describe(value) -> str:
    return f"{type(value).__name__} {value!r}"


def _type_name(tp) -> str:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is tuple:
        args = typing.get_args(tp)
        return f"a list of {len(args)} {_type_name(args[0])}s"
    return "null" if tp is type(None) else tp.__name__


def _coerce(value, tp, where: str):
    """Check ``value`` against type ``tp`` (int accepted for float); return the typed value."""
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{where}: expected a finite number, got {value!r}")
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, where)
            except ConfigError:
                pass
        raise ConfigError(f"{where}: expected {_type_name(tp)}, got {_describe(value)}")
    if origin is tuple and len(typing.get_args(tp)) == 2 and typing.get_args(tp)[1] is Ellipsis:
        inner = typing.get_args(tp)[0]
        if not isinstance(value, (list, tuple)) or not value:
            raise ConfigError(f"{where}: expected a non-empty list of {inner.__name__}, got {_describe(value)}")
        return tuple(_coerce(v, inner, f"{where}[{i}]") for i, v in enumerate(value))
    if origin is tuple:
        args = typing.get_args(tp)
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ConfigError(f"{where}: expected {_type_name(tp)}, got {_describe(value)}")
        return tuple(_coerce(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if not math.isfinite(value):
                raise ConfigError(f"{where}: expected a finite number, got {value!r}")
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
    raise ConfigError(f"{where}: expected {_type_name(tp)}, got {_describe(value)}")


def _check_meta(value, meta, where: str):
    if "choices" in meta:
        for v in value if isinstance(value, tuple) else (value,):
            if v not in meta["choices"]:
                raise ConfigError(f"{where}: expected one of {list(meta['choices'])}, got {v!r}")
    if "range" in meta and value is not None:
        lo, hi, lo_open, hi_open = meta["range"]
        values = value if isinstance(value, tuple) else (value,)
        for v in values:
            bad = (lo is not None and (v < lo or (lo_open and v == lo))) or (
                hi is not None and (v > hi or (hi_open and v == hi))
            )
            if bad:
                left = ("(" if lo_open else "[") + ("-inf" if lo is None else f"{lo}")
                right = ("inf" if hi is None else f"{hi}") + (")" if hi_open else "]")
                raise ConfigError(f"{where}: expected a value in {left}, {right}, got {v!r}")


def config_from_dict(cls, raw: dict | None, *, source: str = "<config>", prefix: str = ""):
    """Build dataclass ``cls`` from a plain dict, rejecting unknown keys, bad types and ranges."""
    raw = {} if raw is None else raw
    if not isinstance(raw, dict):
        raise ConfigError(
            f"{source}: {prefix.rstrip('.') or 'top level'}: expected a mapping, got {_describe(raw)}"
        )
    hints = typing.get_type_hints(cls)
    known = {f.name: f for f in fields(cls)}
    for key in raw:
        if key not in known:
            raise ConfigError(
                f"{source}: unknown key '{prefix}{key}' (expected one of: {', '.join(known)})"
            )
    kwargs = {}
    for name, f in known.items():
        if name not in raw:
            continue
        tp, where = hints[name], f"{source}: {prefix}{name}"
        if dataclasses.is_dataclass(tp):
            kwargs[name] = config_from_dict(tp, raw[name], source=source, prefix=f"{prefix}{name}.")
        else:
            value = _coerce(raw[name], tp, where)
            _check_meta(value, f.metadata, where)
            kwargs[name] = value
    return cls(**kwargs)


def _set_path(d: dict, dotted: str, value, *, source: str):
    keys = dotted.split(".")
    cur = d
    for k in keys[:-1]:
        nxt = cur.setdefault(k, {})
        if not isinstance(nxt, dict):
            raise ConfigError(f"{source}: cannot set '{dotted}': '{k}' is not a section")
        cur = nxt
    cur[keys[-1]] = value


class _Loader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing a key given twice in one mapping (PyYAML keeps the last one
    silently) and reading ``1e-3`` as a float, as YAML 1.2 does (YAML 1.1 makes it a string)."""

    def construct_mapping(self, node, deep=False):
        seen: dict = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            try:
                first = seen.get(key)
            except TypeError:  # an unhashable key: let PyYAML's own error say so
                break
            if first is not None:
                raise ConfigError(f"line {key_node.start_mark.line + 1}: key {key!r} appears twice in one mapping "
                                  f"(first on line {first}); a duplicate would silently replace the first: keep one")
            seen[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep=deep)


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"))


def _yaml(text: str, source: str):
    """Parse ``text`` with :class:`_Loader`; ConfigError on one line naming ``source`` and the line."""
    try:
        return yaml.load(text, Loader=_Loader)  # noqa: S506 -- a SafeLoader subclass
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
        what = " ".join(str(getattr(e, "problem", None) or e).split())
        raise ConfigError(f"{source}: not valid YAML: {where}{what}") from None


def apply_overrides(raw: dict, overrides: list[str] | None) -> dict:
    """Apply ``key.path=value`` overrides (value parsed as YAML) to a raw config dict."""
    raw = dict(raw)
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE, for example train.epochs=8")
        key, text = item.split("=", 1)
        if not key.strip() or any(not k for k in key.strip().split(".")):
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE with a dotted key, for example train.epochs=8")
        value = _yaml(text, f"--set {item!r}: value")
        _set_path(raw, key.strip(), value, source="--set")
    return raw


def _deep_copy(d):
    return {k: _deep_copy(v) if isinstance(v, dict) else v for k, v in d.items()}


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Load and validate a run config; ``None`` gives the embedded digits default.

    Raises ConfigError (bad content) or FileNotFoundError (no such file).
    """
    source = "<default>" if path is None else str(path)
    raw: dict = {}
    if path is not None:
        raw = _yaml(_read_config_text(Path(path)), source)
        if raw is None:
            raise ConfigError(f"{source}: the file is empty (no config keys); expected a YAML mapping of sections "
                              "such as pipelines/digits.yaml (for the embedded defaults, pass that file)")
        if not isinstance(raw, dict):
            raise ConfigError(f"{source}: expected a mapping at the top level, got {_describe(raw)}")
    raw = apply_overrides(_deep_copy(raw), overrides)
    if overrides:
        source = f"{source} (with --set {' '.join(overrides)})"
    return config_from_dict(RunConfig, raw, source=source)


MAX_CONFIG_BYTES = 1 << 20


def _read_config_text(p: Path) -> str:
    """The text of config file ``p``; one-line errors naming it for every way it can fail."""
    expect = "expected a YAML pipeline file such as pipelines/digits.yaml"
    if p.is_dir():
        raise ConfigError(f"{p}: is a directory; {expect}")
    if not p.exists():
        raise FileNotFoundError(f"config file not found: {p} ({expect})")
    if not p.is_file():
        raise ConfigError(f"{p}: is not a regular file (a device, pipe or socket); {expect}")
    try:
        with open(p, "rb") as f:
            data = f.read(MAX_CONFIG_BYTES + 1)
    except OSError as e:
        raise ConfigError(f"{p}: cannot be read ({e.strerror or e}); {expect}") from None
    if len(data) > MAX_CONFIG_BYTES:
        raise ConfigError(f"{p}: larger than {MAX_CONFIG_BYTES >> 20} MiB, so not a pipeline config; {expect}")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{p}: is not a UTF-8 text file (byte 0x{data[e.start]:02x} at offset {e.start}); "
                          f"{expect}") from None
    if "\x00" in text:
        raise ConfigError(f"{p}: is not a text file (it holds NUL bytes, offset {text.index(chr(0))}); {expect}")
    return text


def describe_fields(cls=RunConfig, prefix: str = "") -> list[tuple[str, Any, str]]:
    """(dotted key, default, help) for every leaf field, for ``--help`` and docs."""
    out = []
    hints = typing.get_type_hints(cls)
    for f in fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            out += describe_fields(tp, f"{prefix}{f.name}.")
        else:
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            out.append((f"{prefix}{f.name}", default, f.metadata.get("help", "")))
    return out
