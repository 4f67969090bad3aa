"""Models as clients name them (``[[models]]``): a model's name, and the other names it answers to.

A coding agent asks for the names of its vendor's cloud (Claude Code a ``claude-*`` name, Codex a
``gpt-*`` one) unless each user changes its settings, and a script may have been written for
another server's name of the model. ``aliases`` lists such names, exactly or as glob patterns
(``fnmatch``'s ``*``, ``?``, ``[...]``, case-sensitive), and the pool serves them with the model
``name``: the name its backends report.

``ModelNames`` resolves a requested name: a model's own name first, then an exact alias, then the
patterns, the most specific first (the most characters that are not wildcards; among equals, the
one given first). A name none of them matches is the model asked for, as without ``[[models]]``.
"""

from __future__ import annotations

import fnmatch
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from local_inference_pool import config_values as values
from local_inference_pool.errors import ConfigError

__all__ = ["MODEL_KEYS", "ModelConfig", "ModelNames", "Resolved", "check_models", "models_from_list"]

MODEL_KEYS = (
    "name",
    "aliases",
    "serve_as",
    "fallbacks",
    "fallback_after",
    "params",
    "preload",
    "idle_unload",
    "load_after",
)
PARAM_KEYS = ("set", "strip")
MAX_PARAMS = 64  # fields set or stripped, per model
KEPT_FIELDS = ("model", "stream")  # what params may not touch: where it goes, and how it answers
MAX_ALIASES = 256  # of all models together: each pattern is tried against an unknown name
_WILDCARDS = re.compile(r"[*?\[]")


@dataclass(frozen=True, slots=True)
class ModelConfig:
    name: str
    aliases: tuple[str, ...] = ()
    # serve_as: a backend's name or kind, and the model's id on those servers
    serve_as: tuple[tuple[str, str], ...] = ()
    fallbacks: tuple[str, ...] = ()  # other models, in order, for when this one cannot serve well
    fallback_after: float | None = None  # seconds of expected queue wait beyond which a fallback serves
    # params: request fields set to a value, and fields taken out, before a request leaves
    params_set: tuple[tuple[str, Any], ...] = ()
    params_strip: tuple[str, ...] = ()
    # Where it lives, on servers that load and unload (``core/residency.py``): loaded at start on
    # these backends (True: on whichever suits), unloaded after this many idle seconds, and loaded
    # on one more server when its queue would wait longer than ``load_after`` seconds.
    preload: tuple[str, ...] | bool = ()
    idle_unload: float | None = None
    load_after: float | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "name", values.string("models.name", self.name))
        object.__setattr__(self, "aliases", values.string_list("models.aliases", self.aliases))
        object.__setattr__(
            self, "serve_as", tuple((str(k), values.string("models.serve_as", v)) for k, v in self.serve_as)
        )
        object.__setattr__(self, "fallbacks", values.string_list("models.fallbacks", self.fallbacks))
        if self.fallback_after is not None:
            object.__setattr__(
                self,
                "fallback_after",
                values.number(positive=True)("models.fallback_after", self.fallback_after),
            )
        for key in ("idle_unload", "load_after"):
            given = getattr(self, key)
            if given is not None:
                object.__setattr__(self, key, values.number(positive=True)(f"models.{key}", given))
        if not isinstance(self.preload, bool):
            object.__setattr__(self, "preload", values.string_list("models.preload", self.preload))
        object.__setattr__(self, "params_set", tuple((str(k), v) for k, v in self.params_set))
        object.__setattr__(self, "params_strip", values.string_list("models.params.strip", self.params_strip))
        touched = [name for name, _ in self.params_set] + list(self.params_strip)
        for name in touched:
            if name in KEPT_FIELDS:
                raise ConfigError(
                    f"models.params: {name!r} may not be set or stripped (it decides where and how a request is answered)"
                )
        try:  # a TOML date or time has no JSON form: refused here, not at each request
            json.dumps(dict(self.params_set))
        except (TypeError, ValueError):
            raise ConfigError("models.params.set: every value must be JSON (no dates or times)") from None
        if len(touched) > MAX_PARAMS:
            raise ConfigError(f"models.params: {len(touched)} fields are more than {MAX_PARAMS}")

    def adjust(self, payload: Mapping[str, Any]) -> dict[str, Any]:
        """``payload`` with this model's params applied: its fields set, then its fields stripped."""
        adjusted = {**payload, **dict(self.params_set)}
        for name in self.params_strip:
            adjusted.pop(name, None)
        return adjusted

    @property
    def has_params(self) -> bool:
        return bool(self.params_set or self.params_strip)

    @property
    def places(self) -> bool:
        """Whether the pool decides where it lives (it has ``preload``, ``idle_unload`` or ``load_after``)."""
        return bool(self.preload) or self.idle_unload is not None or self.load_after is not None


def is_pattern(alias: str) -> bool:
    return _WILDCARDS.search(alias) is not None


@dataclass(frozen=True, slots=True)
class Resolved:
    """A requested name and what serves it: ``model`` the name sent upstream, ``alias`` the alias
    that matched it (a pattern as configured), '' when the name was the model's own."""

    model: str
    alias: str


class ModelNames:
    """The names of ``[[models]]``, looked up."""

    def __init__(self, models: Sequence[ModelConfig]) -> None:
        self._exact: dict[str, str] = {}
        patterns: list[tuple[int, int, str, str]] = []
        for model in models:
            for alias in model.aliases:
                if is_pattern(alias):
                    specificity = len(_WILDCARDS.sub("", alias))
                    patterns.append((-specificity, len(patterns), alias, model.name))
                else:
                    self._exact[alias] = model.name
        self._patterns = [(alias, name) for _, _, alias, name in sorted(patterns)]
        self.names = frozenset(model.name for model in models)
        self._with_params = {model.name: model for model in models if model.has_params}
        self._falling = {model.name: model for model in models if model.fallbacks}
        # (backend name or kind, the server's id) -> the model; and the reverse, per model
        self._from_id = {(where, id_): model.name for model in models for where, id_ in model.serve_as}
        self._ids = {model.name: dict(model.serve_as) for model in models if model.serve_as}

    def __bool__(self) -> bool:
        return bool(self._exact or self._patterns or self._with_params or self._falling)

    def canonical(self, backend: str, kind: str, reported: str) -> str:
        """The model a server's own id stands for (``serve_as``, by the backend's name first, then
        its kind), else the id as it is."""
        return self._from_id.get((backend, reported)) or self._from_id.get((kind, reported)) or reported

    @property
    def renames(self) -> bool:
        """Whether some model has another id on some server (``serve_as``)."""
        return bool(self._ids)

    def upstream_id(self, model: str, backend: str, kind: str) -> str:
        """The id a backend knows ``model`` by (``serve_as``), else the model's name."""
        ids = self._ids.get(model)
        if ids is None:
            return model
        return ids.get(backend) or ids.get(kind) or model

    def candidates(self, model: str) -> list[tuple[str, float | None]]:
        """The models that may serve a request for ``model``, in order: itself, then its
        fallbacks and theirs (depth first, each once), with each one's ``fallback_after``."""
        found: list[tuple[str, float | None]] = []
        seen: set[str] = set()

        def visit(name: str) -> None:
            if name in seen:
                return
            seen.add(name)
            entry = self._falling.get(name)
            found.append((name, entry.fallback_after if entry is not None else None))
            for fallback in entry.fallbacks if entry is not None else ():
                visit(fallback)

        visit(model)
        return found

    def falls_back(self, model: str) -> bool:
        return model in self._falling

    def params_of(self, model: str) -> ModelConfig | None:
        """The model's entry when it has params to apply to its requests."""
        return self._with_params.get(model)

    def resolve(self, asked: str) -> Resolved | None:
        """What serves ``asked``, or None when it is no alias (served as it is named)."""
        if asked in self.names:
            return None
        model = self._exact.get(asked)
        if model is not None:
            return Resolved(model, asked)
        for pattern, model in self._patterns:
            if fnmatch.fnmatchcase(asked, pattern):
                return Resolved(model, pattern)
        return None

    def canonical_of(self, name: str) -> str:
        """The model an exact alias names, else the name."""
        return self._exact.get(name, name)

    def exact_aliases(self) -> dict[str, str]:
        """Each exact alias and its model (patterns are not names a client can be shown)."""
        return dict(self._exact)


def models_from_list(section: Any) -> tuple[ModelConfig, ...]:
    """The ``[[models]]`` tables, checked: each name once, and no name given to two models."""
    if not isinstance(section, list) or not all(isinstance(entry, Mapping) for entry in section):
        raise ConfigError(f"models: {section!r} is not allowed; expected an array of tables")
    models: list[ModelConfig] = []
    for index, entry in enumerate(section):
        where = f"models[{index}]"
        for key in entry:
            if key not in MODEL_KEYS:
                raise ConfigError(
                    f"{where}: unknown key {str(key)[:64]!r}; known keys: {', '.join(MODEL_KEYS)}"
                )
        if "name" not in entry:
            raise ConfigError(f"{where}.name: missing; every model needs the name its backends report")
        params_set, params_strip = _params(entry.get("params", {}), f"{where}.params")
        serve_as = entry.get("serve_as", {})
        if not isinstance(serve_as, Mapping) or not all(isinstance(v, str) and v for v in serve_as.values()):
            raise ConfigError(
                f"{where}.serve_as: {serve_as!r} is not allowed; expected a table of backend name or kind = model id"
            )
        try:  # the values are checked by ModelConfig, its messages then named by the entry's index
            models.append(
                ModelConfig(
                    entry["name"],
                    entry.get("aliases", ()),
                    tuple(serve_as.items()),
                    entry.get("fallbacks", ()),
                    entry.get("fallback_after"),
                    params_set,
                    params_strip,
                    entry.get("preload", ()),
                    entry.get("idle_unload"),
                    entry.get("load_after"),
                )
            )
        except ConfigError as exc:
            raise ConfigError(str(exc).replace("models.", f"{where}.", 1)) from None
    check_models(models)
    return tuple(models)


def _params(section: Any, where: str) -> tuple[tuple[tuple[str, Any], ...], Any]:
    """The ``params`` table's ``set`` (as pairs) and ``strip`` (as given: ModelConfig checks it)."""
    if not isinstance(section, Mapping):
        raise ConfigError(f"{where}: {section!r} is not allowed; expected a table with set and strip")
    for key in section:
        if key not in PARAM_KEYS:
            raise ConfigError(f"{where}: unknown key {str(key)[:64]!r}; known keys: {', '.join(PARAM_KEYS)}")
    given = section.get("set", {})
    if not isinstance(given, Mapping):
        raise ConfigError(f"{where}.set: {given!r} is not allowed; expected a table of request fields")
    return tuple(given.items()), section.get("strip", ())


def check_models(models: Sequence[ModelConfig]) -> None:
    """Each model's name once, and no alias that is another name or alias. A pattern may match a
    model's name: a model's own name is looked up first, so it still reaches that model."""
    owner: dict[str, str] = {}  # every name and alias -> where it is given
    for index, model in enumerate(models):
        where = f"models[{index}]"
        if not model.name.isprintable():  # it goes out in the x-served-model header
            raise ConfigError(f"{where}.name: {model.name!r} is not allowed; expected a printable name")
        if model.name in owner:
            raise ConfigError(f"{where}.name: {model.name!r} is given twice ({owner[model.name]} has it)")
        owner[model.name] = f"{where}.name"
    count = 0
    for index, model in enumerate(models):
        for alias in model.aliases:
            where = f"models[{index}].aliases"
            count += 1
            if not alias.strip() or not alias.isprintable():
                raise ConfigError(f"{where}: {alias!r} is not allowed; expected a printable name")
            if is_pattern(alias) and "(?!)" in fnmatch.translate(alias):
                raise ConfigError(
                    f"{where}: {alias!r} is not allowed; it matches no name (a character range "
                    "that is empty, such as [z-a])"
                )
            if alias in owner:
                raise ConfigError(
                    f"{where}: {alias!r} is not allowed; it shadows {owner[alias]} (a name is one model's)"
                )
            owner[alias] = where
    served: dict[tuple[str, str], str] = {}
    for index, model in enumerate(models):
        for where, id_ in model.serve_as:
            if (where, id_) in served:
                raise ConfigError(
                    f"models[{index}].serve_as: {where} = {id_!r} is already {served[(where, id_)]}'s; "
                    "one id on one server is one model"
                )
            served[(where, id_)] = model.name
    _check_loops(models)
    if count > MAX_ALIASES:
        raise ConfigError(f"models: {count} aliases are more than {MAX_ALIASES}")


def _check_loops(models: Sequence[ModelConfig]) -> None:
    """No model falls back, through others, to itself: refused in one line that names the loop."""
    fallbacks = {model.name: model.fallbacks for model in models}
    for number, model in enumerate(models):
        loop = _loop_from(model.name, fallbacks)
        if loop:
            raise ConfigError(f"models[{number}].fallbacks: a loop: {' -> '.join(loop)}")


def _loop_from(start: str, fallbacks: Mapping[str, tuple[str, ...]]) -> list[str]:
    """A path of fallbacks from ``start`` back to it, or [] when there is none."""
    stack: list[tuple[str, list[str]]] = [(start, [start])]
    seen: set[str] = set()
    while stack:
        name, path = stack.pop()
        for fallback in fallbacks.get(name, ()):
            if fallback == start:
                return [*path, fallback]
            if fallback not in seen:
                seen.add(fallback)
                stack.append((fallback, [*path, fallback]))
    return []
