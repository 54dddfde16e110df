"""Reward-function registry: ``--reward_funcs`` names -> callables, and ``--external_plugins`` files.

An entry is either a plain function ``f(completions, **columns) -> list[float]``, used as is, or a
class, instantiated once per run the way ms-swift instantiates its ``orms`` classes: every
``__init__`` parameter whose name is an option (``cosine_max_len``, ``max_completion_length``,
``tokenizer``, ...) is passed that option's value; the instance is then the callable.

A plugin file (``--external_plugins my_rewards.py``) registers entries in either (or both) ways::

    import jaxalign.rewards

    @jaxalign.rewards.register("my_reward")      # a function or a class
    def my_reward(completions, solution, **kwargs):
        return [float(c.strip() == s) for c, s in zip(completions, solution)]

    reward_funcs = {"other_reward": other_fn}    # module-level dict, read after import
                                                 # (``orms = {...}``, ms-swift's name, works too)

A plugin may reuse a built-in name to replace it.
"""

from __future__ import annotations

import importlib.util
import inspect
import os
import sys
from typing import Any, Callable, Iterable, Mapping, Sequence

from jaxalign.errors import ConfigError, JaxalignError
from jaxalign.rewards._text import short_error
from jaxalign.rewards.cosine import CosineReward
from jaxalign.rewards.exact_match import exact_match_reward
from jaxalign.rewards.format_reward import format_reward
from jaxalign.rewards.math_accuracy import accuracy
from jaxalign.rewards.repetition import RepetitionPenalty
from jaxalign.rewards.soft_overlong import SoftOverlong

RewardFunc = Callable[..., list[float]]

BUILTIN_REWARDS: dict[str, Any] = {
    "accuracy": accuracy,
    "format": format_reward,
    "cosine": CosineReward,
    "repetition": RepetitionPenalty,
    "soft_overlong": SoftOverlong,
    "exact_match": exact_match_reward,
}

_REGISTRY: dict[str, Any] = dict(BUILTIN_REWARDS)
PLUGIN_DICT_NAMES = ("reward_funcs", "orms")


def register(name: str) -> Callable[[Any], Any]:
    """Decorator registering a reward function or class under ``name`` (for ``--reward_funcs``)."""
    if not isinstance(name, str) or not name:
        raise ConfigError(f"reward function names must be non-empty strings, got {name!r}")

    def decorate(entry: Any) -> Any:
        if not callable(entry):
            raise ConfigError(f"reward function '{name}' must be a function or a class, got {type(entry).__name__}")
        _REGISTRY[name] = entry
        return entry

    return decorate


def unregister(name: str) -> None:
    """Remove ``name``; a built-in name gets its built-in entry back."""
    if name in BUILTIN_REWARDS:
        _REGISTRY[name] = BUILTIN_REWARDS[name]
    else:
        _REGISTRY.pop(name, None)


def available_reward_funcs() -> list[str]:
    """Sorted names that ``--reward_funcs`` accepts now (built-ins and loaded plugins)."""
    return sorted(_REGISTRY)


def load_plugins(path: str) -> list[str]:
    """Import a plugin file (see module doc); returns the names registered by its module-level dict.

    Names registered with :func:`register` are added while the file is imported.
    """
    if not os.path.isfile(path):
        raise ConfigError(f"--external_plugins file {path} does not exist")
    module_name = f"jaxalign_reward_plugin_{abs(hash(os.path.abspath(path)))}"
    try:
        spec = importlib.util.spec_from_file_location(module_name, path)
        if spec is None or spec.loader is None:
            raise ImportError("not a Python file")
        module = importlib.util.module_from_spec(spec)
        sys.modules[module_name] = module
        spec.loader.exec_module(module)
    except JaxalignError as err:
        sys.modules.pop(module_name, None)
        raise ConfigError(f"--external_plugins file {path}: {err}") from err
    except BaseException as err:  # SyntaxError, ImportError, SystemExit, ... in user code
        sys.modules.pop(module_name, None)
        if isinstance(err, KeyboardInterrupt):
            raise
        raise ConfigError(
            f"--external_plugins file {path} failed to import: {short_error(err)}"
        ) from err
    names = []
    for dict_name in PLUGIN_DICT_NAMES:
        entries = getattr(module, dict_name, None)
        if entries is None:
            continue
        if not isinstance(entries, Mapping):
            raise ConfigError(f"--external_plugins file {path}: '{dict_name}' must be a dict name -> function")
        for name, entry in entries.items():
            register(name)(entry)
            names.append(name)
    return names


def _option_kwargs(entry: type, options: Mapping[str, Any]) -> dict[str, Any]:
    params = inspect.signature(entry.__init__).parameters
    return {
        key: options[key]
        for key, param in params.items()
        if key != "self"
        and param.kind in (param.POSITIONAL_OR_KEYWORD, param.KEYWORD_ONLY)
        and key in options
    }


def instantiate(name: str, entry: Any, options: Mapping[str, Any]) -> RewardFunc:
    """The callable for registry ``entry``: a class is built from the matching options, a function is returned."""
    if not inspect.isclass(entry):
        return entry
    try:
        return entry(**_option_kwargs(entry, options))
    except JaxalignError:
        raise
    except Exception as err:
        raise ConfigError(f"reward function '{name}' could not be built: {short_error(err)}") from err


def split_names(value) -> list[str]:
    """``--reward_funcs "accuracy format"`` (or comma-separated, or a list) -> ["accuracy", "format"]."""
    if not value:
        return []
    if isinstance(value, (list, tuple)):
        return [str(v) for v in value]
    return [v for v in str(value).replace(",", " ").split() if v]


def build_reward_funcs(
    names: Sequence[str], options: Mapping[str, Any] | None = None, plugins: Iterable[str] = ()
) -> list[tuple[str, RewardFunc]]:
    """Load ``plugins``, then return ``(name, callable)`` for each of ``names`` in order.

    ``options`` are the run's options (ms-swift flag names); a ``tokenizer`` key is passed to the
    classes that take one.
    """
    options = {} if options is None else options
    for path in plugins:
        load_plugins(path)
    seen: set[str] = set()
    funcs = []
    for name in names:
        if name not in _REGISTRY:
            raise ConfigError(
                f"unknown reward function '{name}'; valid names: {', '.join(available_reward_funcs())}"
                " (add your own with --external_plugins FILE.py)"
            )
        if name in seen:
            raise ConfigError(f"reward function '{name}' is listed twice in --reward_funcs")
        seen.add(name)
        funcs.append((name, instantiate(name, _REGISTRY[name], options)))
    return funcs

