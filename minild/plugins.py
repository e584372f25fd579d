"""The plugin manager and the per-kind registries of named stage factories.

Built-in stages and third-party ones are found the same way: through the ``minild``
entry-point group. ``MINILD_PLUGINS`` (comma-separated entry-point names) limits which
third-party plugins load; set it to an empty string to load only the built-ins.
"""

from __future__ import annotations

import difflib
import importlib.metadata
import os
import warnings
from dataclasses import dataclass
from typing import Any, Callable

import pluggy

from minild import hookspecs

ENTRY_POINT_GROUP = "minild"

# Each stage kind and the registration hook that fills its registry.
KINDS = {
    "schedule": "register_schedules",
    "model": "register_models",
    "sampler": "register_samplers",
    "guidance": "register_guidances",
    "vae": "register_vaes",
    "text_encoder": "register_text_encoders",
    "hooks": "register_trainer_hooks",
}


class PluginError(ValueError):
    """A plugin or stage name is wrong: unknown, duplicated, or badly registered."""


@dataclass(frozen=True)
class Registration:
    kind: str
    name: str
    factory: Callable[..., Any]
    plugin: str  # the plugin (module or object) name that registered it
    package: str  # the distribution that ships that plugin, or "" if none


_manager: pluggy.PluginManager | None = None
_packages: dict[str, str] = {}  # plugin name -> "distribution version"
broken_plugins: dict[str, str] = {}  # plugin name -> why it failed to load
_registries: dict[str, dict[str, Registration]] | None = None


def get_plugin_manager() -> pluggy.PluginManager:
    """The process-wide plugin manager, with entry-point plugins loaded."""
    global _manager
    if _manager is None:
        pm = pluggy.PluginManager("minild")
        pm.add_hookspecs(hookspecs)
        _load_entry_points(pm)
        pm.check_pending()
        _manager = pm
    return _manager


def _load_entry_points(pm: pluggy.PluginManager) -> None:
    """Register every ``minild`` entry point; a plugin that fails to import is skipped.

    With ``MINILD_PLUGINS`` set, third-party entry points load only when named in it;
    the built-in stages (the ``minild`` distribution's own entry points) always load.
    """
    allow = os.environ.get("MINILD_PLUGINS")
    allowed = None if allow is None else {name.strip() for name in allow.split(",") if name.strip()}
    seen: set[str] = set()
    for dist in importlib.metadata.distributions():
        name = (dist.metadata["Name"] or "").lower().replace("_", "-")
        if name in seen:  # shadowed by an installation earlier on sys.path, which imports win too
            continue
        seen.add(name)
        package = f"{dist.metadata['Name']} {dist.version}"
        builtin = name == "minild"
        for entry_point in dist.entry_points.select(group=ENTRY_POINT_GROUP):
            if allowed is not None and not builtin and entry_point.name not in allowed:
                continue
            if pm.get_plugin(entry_point.name) is not None or entry_point.name in broken_plugins:
                owner = _packages.get(entry_point.name) or broken_plugins[entry_point.name].split(":", 1)[0]
                reason = f"its entry-point name {entry_point.name!r} is already taken by {owner}"
                broken_plugins[f"{entry_point.name} ({package})"] = f"{package}: {reason}"
                warnings.warn(
                    f"minild plugin {entry_point.name!r} ({package}) was not loaded: {reason}; "
                    "uninstall one of the two or rename the entry point", stacklevel=2,
                )
                continue
            try:
                plugin = entry_point.load()
                pm.register(plugin, name=entry_point.name)
            except Exception as err:  # a broken third-party plugin must not take minild down
                broken_plugins[entry_point.name] = f"{package}: {type(err).__name__}: {err}"
                warnings.warn(f"minild plugin {entry_point.name!r} ({package}) failed to load: {err}", stacklevel=2)
                continue
            _packages[entry_point.name] = package


def register_plugin(plugin: object, name: str | None = None) -> str:
    """Register a plugin object or module at run time (tests, notebooks, scripts).

    Returns the name it was registered under; pass it to ``unregister_plugin``.
    """
    pm = get_plugin_manager()
    registered = pm.register(plugin, name=name)
    pm.check_pending()
    _invalidate()
    return registered


def unregister_plugin(name: str) -> None:
    get_plugin_manager().unregister(name=name)
    _invalidate()


def reset_plugin_manager() -> None:
    """Forget the manager and registries; the next use reloads the entry points.

    Call this after installing a plugin package into a running interpreter.
    """
    global _manager
    _manager = None
    _packages.clear()
    broken_plugins.clear()
    _invalidate()


def _invalidate() -> None:
    global _registries
    _registries = None




def _collect(kind: str) -> dict[str, Registration]:
    pm = get_plugin_manager()
    hook = getattr(pm.hook, KINDS[kind])
    registry: dict[str, Registration] = {}
    # Call each implementation on its own so every name knows which plugin gave it.
    for impl in reversed(hook.get_hookimpls()):
        plugin_name = impl.plugin_name
        package = _packages.get(plugin_name, "")

        def register(name: str, factory: Callable[..., Any], _plugin=plugin_name, _package=package):
            if not isinstance(name, str) or not name:
                raise PluginError(f"plugin {_plugin!r} registered a {kind} with a bad name {name!r}")
            if not callable(factory):
                raise PluginError(f"plugin {_plugin!r} registered {kind} {name!r} with a non-callable factory")
            if name in registry:
                other = registry[name].plugin
                raise PluginError(
                    f"{kind} {name!r} is registered twice: by plugin {other!r} and by plugin {_plugin!r}; "
                    "uninstall one of them or limit plugins with MINILD_PLUGINS"
                )
            registry[name] = Registration(kind, name, factory, _plugin, _package)

        kwargs = {"register": register}
        impl.function(**{arg: kwargs[arg] for arg in impl.argnames})
    return registry


def registry(kind: str) -> dict[str, Registration]:
    """Name → Registration for one stage kind."""
    global _registries
    if kind not in KINDS:
        raise PluginError(f"unknown stage kind {kind!r}; the kinds are: {', '.join(KINDS)}")
    if _registries is None:
        _registries = {}
    if kind not in _registries:
        _registries[kind] = _collect(kind)
    return _registries[kind]


def available(kind: str) -> list[str]:
    """Sorted names of every registered stage of ``kind``."""
    return sorted(registry(kind))


def lookup(kind: str, name: str) -> Registration:
    entries = registry(kind)
    if name not in entries:
        names = ", ".join(sorted(entries)) or "(none installed)"
        raise PluginError(f"unknown {kind} {name!r}{did_you_mean(name, entries)}; available: {names}")
    return entries[name]


def did_you_mean(name: Any, options) -> str:
    """`` (did you mean 'closest'?)`` for a misspelt ``name``, or ``""`` when no option is close."""
    close = difflib.get_close_matches(str(name), [str(option) for option in options], n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def create(kind: str, name: str, /, *args: Any, **params: Any) -> Any:
    """Build the stage ``name`` of ``kind`` with keyword ``params``.

    Samplers take the schedule as their one positional argument.
    """
    return lookup(kind, name).factory(*args, **params)
