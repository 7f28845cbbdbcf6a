"""The plugin registry: components found through the ``statelab`` entry-point group.

A plugin is a module (the entry point's target) that declares the plugin API it was
written for and implements the ``statelab_components`` hook::

    # my_plugin/plugin.py: cheap to import, no torch models built here
    from statelab.plugins import Component, hookimpl

    STATELAB_PLUGIN_API = 1

    @hookimpl
    def statelab_components():
        return [Component(slot="memory", name="window-mean", params=WindowMeanParams,
                          factory="my_plugin.window:build", description="...")]

and is declared in its ``pyproject.toml``::

    [project.entry-points.statelab]
    my-plugin = "my_plugin.plugin"

Entry points load one at a time: a plugin that fails to import, declares an incompatible
API, or registers a name another distribution already registered is recorded as a
:class:`LoadFailure` and the others still load. ``STATELAB_STRICT_PLUGINS=1`` (or
``strict=True``) re-raises instead. ``STATELAB_PLUGINS=a,b`` loads only the named entry
points; ``STATELAB_NO_PLUGINS=1`` loads none. ``STATELAB_PLUGIN_MODULES=pkg.mod,...``
additionally registers plugin modules by import path, without packaging (for developing a
plugin, and for tests: ``STATELAB_PLUGIN_MODULES=statelab.testing.toys``).
"""

from __future__ import annotations

import importlib
import importlib.metadata as md
import os
import traceback
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any, Callable, Iterable, Literal, Sequence

import pluggy
from pydantic import BaseModel

PLUGIN_API_VERSION = 1
ENTRY_POINT_GROUP = "statelab"
Slot = Literal["backbone", "memory", "planner", "regularizer", "probe", "task"]
SLOTS: tuple[str, ...] = ("backbone", "memory", "planner", "regularizer", "probe", "task")

hookspec = pluggy.HookspecMarker("statelab")
hookimpl = pluggy.HookimplMarker("statelab")

#: First-party kinds and the distribution that provides them, for install hints. Strings
#: only: core never imports a plugin.
FIRST_PARTY: dict[tuple[str, str], str] = {
    ("backbone", "mamba"): "crsm-planner",
    ("planner", "mcts"): "crsm-planner",
    ("probe", "planner-effect"): "crsm-planner",
    ("probe", "injection-stability"): "crsm-planner",
    ("memory", "hebbian"): "crsd-memory",
    ("memory", "episodic"): "crsd-memory",
    ("memory", "dual"): "crsd-memory",
    ("backbone", "crsd"): "crsd-memory",
    ("probe", "memory-use"): "crsd-memory",
    ("backbone", "s4d"): "crsd-memory",
    ("backbone", "retnet"): "crsd-memory",
    ("backbone", "s5"): "crsd-memory",
    ("backbone", "linoss"): "crsd-memory",
    ("backbone", "samba"): "crsd-memory",
    ("backbone", "kssm"): "kssm-oscillators",
    ("regularizer", "bistability"): "kssm-oscillators",
    ("probe", "causality"): "kssm-oscillators",
    ("probe", "r-zones"): "kssm-oscillators",
    ("memory", "then"): "then-memory",
    ("probe", "passkey"): "then-memory",
    ("backbone", "transformer"): "traces-crystallize",
    ("regularizer", "load-balance"): "traces-crystallize",
    ("regularizer", "trace-utilization"): "traces-crystallize",
    ("regularizer", "crystallization"): "traces-crystallize",
    ("regularizer", "ewc"): "traces-crystallize",
    ("probe", "motifs"): "traces-crystallize",
    ("probe", "traces"): "traces-crystallize",
}


class PluginError(Exception):
    """A plugin could not be loaded or registered."""


class DuplicateComponentError(PluginError):
    pass


class IncompatiblePluginError(PluginError):
    pass


class HookSpecs:
    @hookspec
    def statelab_components(self) -> list["Component"]:  # type: ignore[empty-body]
        """Return the :class:`Component` objects this plugin provides."""

    @hookspec
    def statelab_commands(self) -> list["Command"]:  # type: ignore[empty-body]
        """Return extra ``statelab`` CLI sub-commands (:class:`Command`) this plugin provides."""

    @hookspec
    def statelab_callbacks(self) -> list["CallbackEntry"]:  # type: ignore[empty-body]
        """Return named training callbacks (:class:`CallbackEntry`); a run uses those in ``train.callbacks``."""


@dataclass
class CallbackEntry:
    """A training callback a plugin registers under ``name`` (see :mod:`statelab.callbacks`).

    ``factory``: ``"module:function"`` (imported on use) or a callable, called as
    ``factory(spec)`` with the run's :class:`~statelab.spec.RunSpec`; it returns a
    :class:`statelab.callbacks.Callback`. A run uses it when ``train.callbacks`` names it.
    """

    name: str
    factory: str | Callable[[Any], Any]
    description: str = ""
    distribution: str = "<local>"

    def build(self, spec: Any) -> Any:
        return Command._load(self.factory)(spec)


@dataclass
class Command:
    """A CLI sub-command contributed by a plugin: ``statelab <name> ...``.

    ``configure(parser)`` adds its arguments to an ``argparse`` parser; ``run(args) -> int``
    executes it (exit code). Both may be ``"module:function"`` strings, imported on use.
    """

    name: str
    help: str
    configure: str | Callable[[Any], None]
    run: str | Callable[[Any], int]
    distribution: str = "<local>"

    @staticmethod
    def _load(ref: str | Callable[..., Any]) -> Callable[..., Any]:
        if callable(ref):
            return ref
        module_name, _, attr = ref.partition(":")
        return getattr(importlib.import_module(module_name), attr)


def _as_list(value: Any, params: BaseModel | None) -> list[str]:
    if value is None:
        return []
    if callable(value):
        return list(value(params))
    return list(value)


@dataclass
class Component:
    """One registered component.

    * ``slot``: backbone, memory, planner, regularizer, probe or task (a benchmark task:
      :class:`statelab.interfaces.Task`, named by ``data.kind`` and by bench suites);
      ``name``: its kind in specs.
    * ``params``: a pydantic model (use ``extra="forbid"`` and ``Field(description=...)``).
    * ``factory``: ``"module:function"`` (imported only when built) or a callable, called as
      ``factory(params, ctx)`` with a :class:`statelab.build.BuildContext`.
    * ``publishes``: internal names the built component publishes, or ``f(params) -> names``.
    * ``requires``: internal names it needs (regularizers, probes), or ``f(params) -> names``.
    * ``capabilities`` / ``needs``: capability words; a planner ``needs={"injectable_state"}``
      and a steerable backbone has ``capabilities={"injectable_state"}``.
    """

    slot: str
    name: str
    params: type[BaseModel]
    factory: str | Callable[..., Any]
    description: str = ""
    publishes: Sequence[str] | Callable[[Any], Iterable[str]] = ()
    requires: Sequence[str] | Callable[[Any], Iterable[str]] = ()
    capabilities: frozenset[str] = frozenset()
    needs: frozenset[str] = frozenset()
    # filled by the registry
    distribution: str = "<local>"
    version: str = ""

    def __post_init__(self) -> None:
        if self.slot not in SLOTS:
            raise PluginError(f"component {self.name!r}: slot {self.slot!r} is not one of {', '.join(SLOTS)}")
        self.capabilities = frozenset(self.capabilities)
        self.needs = frozenset(self.needs)

    def published(self, params: BaseModel | None) -> list[str]:
        return _as_list(self.publishes, params)

    def required(self, params: BaseModel | None) -> list[str]:
        return _as_list(self.requires, params)

    def load_factory(self) -> Callable[..., Any]:
        if callable(self.factory):
            return self.factory
        module_name, _, attr = self.factory.partition(":")
        module = importlib.import_module(module_name)
        return getattr(module, attr)


@dataclass
class LoadFailure:
    entry_point: str
    distribution: str
    version: str
    error: str
    detail: str = ""

    def __str__(self) -> str:
        return f"{self.distribution} {self.version} (entry point {self.entry_point!r}): {self.error}"


@dataclass
class Registry:
    """Components by slot and name, plus the failures met while loading."""

    components: dict[tuple[str, str], Component] = field(default_factory=dict)
    failures: list[LoadFailure] = field(default_factory=list)
    duplicates: dict[tuple[str, str], list[Component]] = field(default_factory=dict)
    commands: dict[str, Command] = field(default_factory=dict)
    callbacks: dict[str, CallbackEntry] = field(default_factory=dict)
    strict: bool = False

    def __post_init__(self) -> None:
        self._pm = pluggy.PluginManager("statelab")
        self._pm.add_hookspecs(HookSpecs)

    # -- registration ---------------------------------------------------------------
    def register_plugin(
        self, plugin: ModuleType | Any, *, distribution: str = "<local>", version: str = "", entry_point: str = ""
    ) -> list[Component]:
        """Register one plugin object (module or instance with a ``statelab_components`` hook)."""
        name = entry_point or getattr(plugin, "__name__", repr(plugin))
        try:
            api = getattr(plugin, "STATELAB_PLUGIN_API", None)
            if api != PLUGIN_API_VERSION:
                raise IncompatiblePluginError(
                    f"{distribution} {version} was written for statelab plugin API {api!r}; this statelab-core "
                    f"({_core_version()}) provides API {PLUGIN_API_VERSION}. Install a {distribution} release "
                    f"made for plugin API {PLUGIN_API_VERSION}, or a statelab-core matching the plugin."
                )
            self._pm.register(plugin, name=f"{distribution}:{name}")
            try:  # registered alone, so the hook calls return this plugin's contributions only
                produced = self._pm.hook.statelab_components()
                commands = [c for batch in self._pm.hook.statelab_commands() for c in (batch or [])]
                callbacks = [c for batch in self._pm.hook.statelab_callbacks() for c in (batch or [])]
            finally:
                self._pm.unregister(plugin)
            for cb in callbacks:
                cb.distribution = distribution
                if cb.name in self.callbacks:
                    raise PluginError(f"callback {cb.name!r} is provided by both {self.callbacks[cb.name].distribution} and {distribution}")
                self.callbacks[cb.name] = cb
            for cmd in commands:
                cmd.distribution = distribution
                if cmd.name in self.commands:
                    raise PluginError(f"command {cmd.name!r} is provided by both {self.commands[cmd.name].distribution} and {distribution}")
                self.commands[cmd.name] = cmd
            components = [c for batch in produced for c in (batch or [])]
            for comp in components:
                if not isinstance(comp, Component):
                    raise PluginError(f"statelab_components returned {type(comp).__name__}, not Component")
            for comp in components:
                comp.distribution, comp.version = distribution, version
                self._add(comp)
            return components
        except Exception as exc:  # noqa: BLE001 - a broken plugin must not stop the others
            self._record(name, distribution, version, exc)
            return []

    def _add(self, comp: Component) -> None:
        key = (comp.slot, comp.name)
        if key in self.duplicates:
            self.duplicates[key].append(comp)
        elif key in self.components:
            first = self.components.pop(key)
            self.duplicates[key] = [first, comp]
        else:
            self.components[key] = comp
            return
        err = DuplicateComponentError(self._duplicate_message(key))
        if self.strict:
            raise err
        self.failures.append(LoadFailure("", comp.distribution, comp.version, str(err)))

    def _duplicate_message(self, key: tuple[str, str]) -> str:
        providers = " and ".join(f"{c.distribution} {c.version}".strip() for c in self.duplicates[key])
        return (
            f"{key[0]} {key[1]!r} is registered by both {providers}; uninstall one of them "
            f"(or select plugins with STATELAB_PLUGINS)"
        )

    def _record(self, entry_point: str, distribution: str, version: str, exc: BaseException) -> None:
        if self.strict:
            raise exc
        self.failures.append(
            LoadFailure(
                entry_point=entry_point,
                distribution=distribution,
                version=version,
                error=f"{type(exc).__name__}: {exc}",
                detail="".join(traceback.format_exception(exc)),
            )
        )

    def load_entry_points(self, group: str = ENTRY_POINT_GROUP) -> None:
        for module_name in filter(None, (m.strip() for m in os.environ.get("STATELAB_PLUGIN_MODULES", "").split(","))):
            try:
                module = importlib.import_module(module_name)
            except Exception as exc:  # noqa: BLE001
                self._record(module_name, module_name, "", exc)
                continue
            self.register_plugin(module, distribution=module_name, version="dev", entry_point=module_name)
        if os.environ.get("STATELAB_NO_PLUGINS", "") not in ("", "0"):
            return
        chosen = os.environ.get("STATELAB_PLUGINS")
        wanted = {s.strip() for s in chosen.split(",") if s.strip()} if chosen is not None else None
        for ep in sorted(md.entry_points(group=group), key=lambda e: e.name):
            if wanted is not None and ep.name not in wanted:
                continue
            dist = ep.dist.metadata["Name"] if ep.dist is not None else "<unknown>"
            version = ep.dist.version if ep.dist is not None else ""
            try:
                module = ep.load()
            except Exception as exc:  # noqa: BLE001
                self._record(ep.name, dist, version, exc)
                continue
            self.register_plugin(module, distribution=dist, version=version, entry_point=ep.name)

    # -- lookup ---------------------------------------------------------------------
    def names(self, slot: str) -> list[str]:
        return sorted(n for s, n in self.components if s == slot)

    def get(self, slot: str, name: str) -> Component:
        key = (slot, name)
        if key in self.components:
            return self.components[key]
        if key in self.duplicates:
            raise DuplicateComponentError(self._duplicate_message(key))
        raise KeyError(unknown_kind_message(self, slot, name))

    def __contains__(self, key: tuple[str, str]) -> bool:
        return key in self.components

    def listing(self) -> list[dict[str, str]]:
        rows = [
            {
                "slot": c.slot,
                "name": c.name,
                "distribution": c.distribution,
                "version": c.version,
                "description": c.description,
            }
            for c in self.components.values()
        ]
        return sorted(rows, key=lambda r: (SLOTS.index(r["slot"]), r["name"]))

    def distributions(self) -> dict[str, str]:
        return {c.distribution: c.version for c in self.components.values()}


def unknown_kind_message(registry: Registry, slot: str, name: str) -> str:
    installed = registry.names(slot)
    msg = f"unknown {slot} kind {name!r}; installed {slot} kinds: {', '.join(installed) if installed else '(none)'}"
    provider = FIRST_PARTY.get((slot, name))
    if provider:
        msg += f". kind {name!r} is provided by {provider}: pip install {provider}"
    return msg


def _core_version() -> str:
    from statelab.__about__ import __version__

    return __version__


_default: Registry | None = None


def get_registry(*, reload: bool = False) -> Registry:
    """The process-wide registry, loaded from entry points on first use."""
    global _default
    if _default is None or reload:
        reg = Registry(strict=os.environ.get("STATELAB_STRICT_PLUGINS", "") not in ("", "0"))
        reg.load_entry_points()
        _default = reg
    return _default


def set_registry(registry: Registry | None) -> None:
    """Replace the process-wide registry (tests); ``None`` reloads from entry points next time."""
    global _default
    _default = registry
