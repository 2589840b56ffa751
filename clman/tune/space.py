"""Search spaces of sweeps: one flat YAML file per sweep, keys are dotted config fields (Ray-free).

    # tune_spaces/finetune_lr_depth.yaml
    finetune.lr:     {loguniform: [1.0e-5, 1.0e-2]}
    model.mma_depth: {randint: [1, 4]}          # 1, 2, 3 or 4

Each key is a ``<section>.<field>`` the job's config has (``finetune.lr``,
``model.mma_depth``, ``data.num_frames``, ``pretrain.temperature``); each
value names one distribution:

``loguniform: [lo, hi]``  a float in [lo, hi], uniform in log space; needs 0 < lo < hi.
                          The right choice for learning rates and weight decay.
``uniform: [lo, hi]``     a float in [lo, hi]; lo < hi.
``randint: [lo, hi]``     an integer from lo to hi, **both ends included**
                          (``randint: [1, 4]`` draws 1, 2, 3 or 4). Ray's
                          ``tune.randint`` excludes ``hi``; the driver passes ``hi + 1``.
``choice: [a, b, ...]``   one of the values, drawn at random per trial.
``grid: [a, b, ...]``     every value: each of ``--samples`` samples is combined with
                          each grid value, so a sweep runs samples x grid-size trials.

Everything is checked when the file is loaded, before any trial starts, by
building the job's config with each candidate value (both bounds of a range)
on top of the sweep's base config, so the config's own type and range checks
apply: a ``choice`` of strings for an int field, a negative learning rate or a
depth of 0 fail here with one line naming the file and the key. ``scale.*``
and the decode resources (``data.decode_tasks``, ``data.decode_cpus``) set
the resources of every trial and cannot be tuned; fix them with ``--set``.
"""

from __future__ import annotations

import copy
import math
import re
from dataclasses import dataclass
from typing import Any, Mapping

import yaml

from clman import config as C

KINDS = ("loguniform", "uniform", "randint", "choice", "grid")
RANGE_KINDS = ("loguniform", "uniform", "randint")
# Fields that size each trial's resources: tuning them would break the concurrency plan.
FIXED_SECTIONS = ("scale",)
FIXED_FIELDS = ("data.decode_tasks", "data.decode_cpus")


class SpaceError(C.ConfigError):
    """A bad search-space file; the message names the file and the key."""


class _Loader(yaml.SafeLoader):
    """YAML 1.1 reads ``1e-5`` as a string and keeps the last of duplicate keys; neither is wanted here."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
                    |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
                    |\.[0-9_]+(?:[eE][-+][0-9]+)?
                    |[-+]?\.(?:inf|Inf|INF)
                    |\.(?:nan|NaN|NAN))$""",
        re.X,
    ),
    list("-+0123456789."),
)


def _no_duplicates(loader: _Loader, node: yaml.MappingNode, deep: bool = False) -> dict:
    seen = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise SpaceError(f"duplicate key {key!r} (line {key_node.start_mark.line + 1})")
        seen.add(key)
    return loader.construct_mapping(node, deep=deep)


_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _no_duplicates)


@dataclass(frozen=True)
class Param:
    """One tuned field: ``key`` is dotted (``finetune.lr``), ``args`` the YAML list as given."""

    key: str
    kind: str
    args: tuple

    def candidates(self) -> list:
        """The values the job's config must accept: every listed value, or both bounds."""
        return list(self.args)

    def largest(self):
        return max(self.args)

    def describe(self) -> str:
        if self.kind in RANGE_KINDS:
            lo, hi = self.args
            ends = " (both included)" if self.kind == "randint" else ""
            return f"{self.kind} [{lo:g}, {hi:g}]{ends}"
        return f"{self.kind} {list(self.args)}"


@dataclass(frozen=True)
class SearchSpace:
    """A checked search space for ``job``; ``source`` names the file in messages."""

    job: str
    params: tuple[Param, ...]
    source: str = "<space>"

    @property
    def keys(self) -> list[str]:
        return [p.key for p in self.params]

    @property
    def has_grid(self) -> bool:
        return any(p.kind == "grid" for p in self.params)

    def get(self, key: str) -> Param | None:
        return next((p for p in self.params if p.key == key), None)

    def to_dict(self) -> dict:
        """The flat YAML mapping this space was read from (JSON-safe: for sweep.json)."""
        return {p.key: {p.kind: list(p.args)} for p in self.params}

    def apply(self, tree: Mapping[str, Any], values: Mapping[str, Any]) -> dict:
        """A copy of the config section ``tree`` with this space's ``values`` set (other keys ignored)."""
        out = copy.deepcopy(dict(tree))
        for key in self.keys:
            if key in values:
                C.set_dotted(out, key, _plain(values[key]))
        return out


def _plain(value):
    """numpy scalars (Ray samples) -> Python numbers; tuples -> lists."""
    if hasattr(value, "item") and not isinstance(value, (list, tuple, dict)):
        value = value.item()
    if isinstance(value, tuple):
        value = list(value)
    return value


def job_sections(job: str) -> list[str]:
    """Sections whose fields a sweep of ``job`` may tune: the job's own and its sub-configs."""
    import dataclasses

    if job not in ("finetune", "pretrain"):
        raise SpaceError(f"unknown job {job!r}; sweeps run: ['finetune', 'pretrain']")
    cls = C.JOB_CONFIGS[job]
    names = {f.name for f in dataclasses.fields(cls)}
    return [job] + [s for s in C.SUB_CONFIGS if s in names]


def _field_names(section: str) -> list[str]:
    import dataclasses

    cls = C.JOB_CONFIGS.get(section) or C.SUB_CONFIGS[section]
    return sorted(f.name for f in dataclasses.fields(cls) if f.name not in C.SUB_CONFIGS)


def _number(where: str, value) -> float | int:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise SpaceError(f"{where}: bounds must be numbers, got {value!r}")
    if not math.isfinite(value):
        raise SpaceError(f"{where}: bounds must be finite, got {value!r}")
    return value


def _param(where: str, key: str, spec: Any) -> Param:
    """Parse one ``key: {kind: [...]}`` entry (shape only; the config check comes after)."""
    if not isinstance(spec, Mapping) or len(spec) != 1:
        raise SpaceError(
            f"{where}: expected one of {list(KINDS)} with a list, e.g. "
            f"{key}: {{loguniform: [1.0e-5, 1.0e-2]}}; got {spec!r}"
        )
    ((kind, args),) = spec.items()
    if kind not in KINDS:
        raise SpaceError(f"{where}: unknown distribution {kind!r}; allowed: {list(KINDS)}")
    if not isinstance(args, (list, tuple)):
        raise SpaceError(f"{where}: {kind} takes a list, got {args!r}")
    if kind in ("choice", "grid"):
        if len(args) == 0:
            raise SpaceError(f"{where}: empty {kind}; list at least one value")
        return Param(key, kind, tuple(args))
    if len(args) != 2:
        raise SpaceError(f"{where}: {kind} takes [lo, hi], got {list(args)!r}")
    lo, hi = (_number(where, v) for v in args)
    if kind == "randint":
        if not (isinstance(lo, int) and isinstance(hi, int)):
            raise SpaceError(f"{where}: randint bounds must be integers, got {list(args)!r}")
        if lo > hi:
            raise SpaceError(f"{where}: randint lo > hi ({lo} > {hi}); both ends are included")
        return Param(key, kind, (lo, hi))
    lo, hi = float(lo), float(hi)
    if lo > hi:
        raise SpaceError(f"{where}: {kind} lo > hi ({lo:g} > {hi:g})")
    if lo == hi:
        raise SpaceError(f"{where}: {kind} range [{lo:g}, {hi:g}] is a single value; fix it with --set {key}=...")
    if kind == "loguniform" and lo <= 0:
        raise SpaceError(f"{where}: loguniform needs 0 < lo, got lo = {lo:g}")
    return Param(key, kind, (lo, hi))


def space_from_dict(
    values: Any, job: str, tree: Mapping[str, Any] | None = None, source: str = "<space>"
) -> SearchSpace:
    """Check a flat ``{dotted key: {kind: [...]}}`` mapping against ``job``'s config built from ``tree``."""
    sections = job_sections(job)
    tree = dict(tree or {})
    if not isinstance(values, Mapping) or not values:
        raise SpaceError(
            f"{source}: expected a mapping of dotted config keys to distributions, "
            f"e.g. finetune.lr: {{loguniform: [1.0e-5, 1.0e-2]}}; got {values!r}"
        )
    params = []
    for key, spec in values.items():
        where = f"{source}: {key}"
        if not isinstance(key, str) or key.count(".") != 1:
            raise SpaceError(f"{source}: key {key!r}: expected <section>.<field>, e.g. finetune.lr")
        section, name = key.split(".")
        if section not in sections:
            raise SpaceError(
                f"{where}: unknown key: section {section!r} is not part of a {job} sweep; allowed sections: {sections}"
            )
        fields = _field_names(section)
        if name not in fields:
            raise SpaceError(f"{where}: unknown key: {section} has no field {name!r}; allowed: {fields}")
        if section in FIXED_SECTIONS or key in FIXED_FIELDS:
            raise SpaceError(
                f"{where}: sets the resources of every trial and cannot be tuned; fix it with --set {key}=..."
            )
        param = _param(where, key, spec)
        for value in param.candidates():
            trial_tree = copy.deepcopy(tree)
            C.set_dotted(trial_tree, key, value)
            try:
                C.job_config(trial_tree, job)
            except C.ConfigError as e:
                raise SpaceError(f"{where}: {param.kind} value {value!r} is not valid: {e}") from None
        params.append(param)
    return SearchSpace(job=job, params=tuple(params), source=source)


def parse_yaml(text: str, source: str = "<space>") -> Any:
    try:
        return yaml.load(text, Loader=_Loader)
    except SpaceError as e:
        raise SpaceError(f"{source}: {e}") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f" at line {mark.line + 1}" if mark is not None else ""
        raise SpaceError(
            f"{source}: not valid YAML{line} ({getattr(e, 'problem', None) or type(e).__name__})"
        ) from None


def load_space(path: str, job: str, tree: Mapping[str, Any] | None = None) -> SearchSpace:
    """Read and check a search-space file (local path or s3:// URI) for ``job``.

    ``tree``: the sweep's base config sections (``clman.config.load_tree``), on top of
    which each candidate value is checked.
    """
    from clman import storage

    try:
        text = storage.read_text(path)
    except storage.StorageNotFoundError:
        raise SpaceError(f"{path}: no such search-space file (see tune_spaces/ for examples)") from None
    return space_from_dict(parse_yaml(text, path), job, tree, source=path)
