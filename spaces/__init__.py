"""Declared search spaces: the schema, the student families and the built-in space files."""

from kdsearch.spaces.families import Family, KnobModel, StagedNet, family_names, get_family, register_family
from kdsearch.spaces.knobs import Choice, Fixed, FloatRange, IntRange, PinnedSuggester, RandomSuggester, Suggester
from kdsearch.spaces.registry import FAMILIES, LOSSES, PRUNERS, QUANTIZERS, SOURCES, Registry, import_ref
from kdsearch.spaces.schema import (
    DEFAULT_SPACE,
    CompressConfig,
    DataConfig,
    DistillConfig,
    Space,
    SpaceError,
    TeacherConfig,
    TrainConfig,
    TrialConfig,
    load_space,
    parse_space,
)

__all__ = [
    "Choice", "CompressConfig", "DEFAULT_SPACE", "DataConfig", "DistillConfig", "FAMILIES", "Family", "Fixed",
    "FloatRange", "IntRange", "KnobModel", "LOSSES", "PRUNERS", "PinnedSuggester", "QUANTIZERS", "RandomSuggester",
    "Registry", "SOURCES", "Space", "SpaceError",
    "StagedNet", "Suggester", "TeacherConfig", "TrainConfig", "TrialConfig", "family_names", "get_family",
    "import_ref", "load_space", "parse_space", "register_family",
]
