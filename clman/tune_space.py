"""Moved to :mod:`clman.tune.space`; this name stays so ``from clman.tune_space import ...`` keeps working."""

from clman.tune.space import (  # noqa: F401
    FIXED_FIELDS, FIXED_SECTIONS, KINDS, RANGE_KINDS, Param, SearchSpace, SpaceError, job_sections, load_space,
    parse_yaml, space_from_dict,
)
