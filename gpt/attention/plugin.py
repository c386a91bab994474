"""User plug-ins: load an attention variant from a file or a module without editing the package.

    resolve_attention("sdpa")                        -> "sdpa" (already registered)
    resolve_attention("my_attn.py:CosineAttention")  -> imports the file, registers the class
    resolve_attention("mypkg.attn:cosine")           -> imports the module; "cosine" may be a class
                                                        in it or a name it registered itself

The spec a variant came from is remembered, so a checkpoint can record it (config.json
"attention_source") and a later process can import it again before building the model.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import sys
from pathlib import Path
from types import ModuleType

from gpt.attention.base import _REGISTRY, Attention, available, register_attention
from gpt.errors import ConfigError

# registry name -> the spec it was loaded from (files as absolute paths)
_SOURCES: dict[str, str] = {}


def attention_source(name: str) -> str | None:
    """The plug-in spec `name` was loaded from, or None for built-ins and in-process registrations."""
    return _SOURCES.get(name)


def resolve_attention(spec: str) -> str:
    """Import and register the variant named by `spec` if needed; return its registry name."""
    if spec in _REGISTRY:
        return spec
    where, sep, attr = spec.rpartition(":")
    if not sep or not where or not attr:
        raise ConfigError(
            f"unknown attention {spec!r}; available: {', '.join(available())} "
            "(or load your own with path/to/file.py:NAME or package.module:NAME)"
        )
    is_file = where.endswith(".py") or "/" in where or "\\" in where
    module, source = _import_file(where) if is_file else _import_module(where)
    name = _registered_name(module, attr, where)
    _SOURCES[name] = f"{source}:{attr}"
    return name


def _import_file(where: str) -> tuple[ModuleType, str]:
    path = Path(where).expanduser().resolve()
    if not path.is_file():
        looked = "" if str(path) == where else f" (looked for {path})"
        raise ConfigError(f"attention plug-in file {where} not found{looked}; check the path")
    # one module per file path, so loading the same file twice does not execute it twice
    mod_name = f"gpt_attention_plugin_{path.stem}_{hashlib.sha1(str(path).encode()).hexdigest()[:8]}"
    if mod_name in sys.modules:
        return sys.modules[mod_name], str(path)
    spec = importlib.util.spec_from_file_location(mod_name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[mod_name] = module
    try:
        spec.loader.exec_module(module)
    except Exception as e:
        del sys.modules[mod_name]
        raise ConfigError(f"attention plug-in file {path} failed to import: {type(e).__name__}: {e}") from None
    return module, str(path)


def _import_module(where: str) -> tuple[ModuleType, str]:
    try:
        return importlib.import_module(where), where
    except ModuleNotFoundError as e:
        raise ConfigError(
            f"attention plug-in module {where!r} cannot be imported ({e}); install it or add its folder to PYTHONPATH"
        ) from None


def _registered_name(module: ModuleType, attr: str, where: str) -> str:
    obj = getattr(module, attr, None)
    if isinstance(obj, type) and issubclass(obj, Attention):
        for name, cls in _REGISTRY.items():
            if cls is obj:
                return name  # the plug-in registered it itself, maybe under another name
        register_attention(attr)(obj)
        return attr
    if attr in _REGISTRY:
        return attr  # a name the module registered on import
    raise ConfigError(
        f"{where} defines no attention {attr!r}: expected a subclass of gpt.attention.Attention "
        "or a name it registers with @register_attention"
    )
