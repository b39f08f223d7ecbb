"""Finding a domain by what a user types (`--domain`), and again later from what an artifact recorded.

`--domain` takes:
- a built-in name: `cre` (the default) or `circuits`;
- the name of an entry point in the group `hmoe_jax.domains`, which a pip-installed package declares
  (`[options.entry_points] hmoe_jax.domains = mine = my_pkg.domain:DOMAIN`);
- an importable module, `my_pkg.my_domain` or `my_pkg.my_domain:ATTR`;
- a `.py` file, `path/to/my_domain.py`.

A module's domain is its attribute `ATTR`, else `DOMAIN`, else its only `Domain` object.

Every artifact records how its domain was found (`Domain.origin`: its name and its `module` or `file`).
A later stage finds it again (`resolve_domain`) by importing the recorded module or entry point, never by
running a recorded file: data never runs code. A file runs only when the user names it on the command
line, and a domain named on the command line must be the one recorded.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import importlib.util
import sys
from importlib import metadata
from pathlib import Path
from typing import Any, Mapping

from .domain import Domain, DomainError

ENTRY_POINT_GROUP = "hmoe_jax.domains"
BUILTIN = {"cre": "hmoe_jax.domains.cre", "circuits": "hmoe_jax.domains.circuits"}
DEFAULT = "cre"


def _domain_in(module: Any, attr: str | None, where: str) -> Domain:
    if attr is not None:
        if not hasattr(module, attr):
            raise DomainError(f"{where} has no attribute {attr!r}")
        found = getattr(module, attr)
    elif isinstance(getattr(module, "DOMAIN", None), Domain):
        found = module.DOMAIN
    else:
        candidates = {id(v): v for v in vars(module).values() if isinstance(v, Domain)}
        if len(candidates) != 1:
            raise DomainError(f"{where} defines {len(candidates)} Domain objects; name one as DOMAIN "
                              "(or pass MODULE:ATTR)")
        found = next(iter(candidates.values()))
    if not isinstance(found, Domain):
        raise DomainError(f"{where}: {attr or 'DOMAIN'} is a {type(found).__name__}, not a hmoe_jax.domains.Domain")
    return found


def _import(module_name: str, where: str):
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        if err.name and module_name.startswith(err.name):
            raise DomainError(f"{where}: no module named {module_name!r}") from None
        raise DomainError(f"{where}: importing {module_name!r} failed: {err}") from err
    except DomainError as err:
        raise DomainError(f"{where}: {err}") from None
    except Exception as err:  # a user's module: any error while importing it is theirs, named as such
        raise DomainError(f"{where}: importing {module_name!r} failed: {type(err).__name__}: {err}") from err


def _from_file(path: Path) -> Domain:
    path = path.expanduser().resolve()
    if not path.is_file():
        raise DomainError(f"domain file {path} does not exist")
    # One module per file, named after its path: loading it twice reuses the first (its experts are
    # registered once).
    name = "hmoe_jax_user_domain_" + hashlib.sha256(str(path).encode()).hexdigest()[:16]
    module = sys.modules.get(name)
    if module is None:
        spec = importlib.util.spec_from_file_location(name, path)
        if spec is None or spec.loader is None:
            raise DomainError(f"domain file {path} cannot be imported as Python")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        try:
            spec.loader.exec_module(module)
        except BaseException as err:
            del sys.modules[name]
            if isinstance(err, DomainError):
                raise DomainError(f"domain file {path}: {err}") from None
            if not isinstance(err, Exception):
                raise
            raise DomainError(f"domain file {path}: {type(err).__name__}: {err}") from err
    domain = _domain_in(module, None, f"domain file {path}")
    return dataclasses.replace(domain, origin={"name": domain.name, "file": str(path)})


def _from_module(spec: str, where: str) -> Domain:
    module_name, _, attr = spec.partition(":")
    domain = _domain_in(_import(module_name, where), attr or None, f"module {module_name}")
    return dataclasses.replace(domain, origin={"name": domain.name, "module": spec})


def _entry_points() -> dict[str, metadata.EntryPoint]:
    return {ep.name: ep for ep in metadata.entry_points(group=ENTRY_POINT_GROUP)}


def load_domain(spec: str | Domain | None = None) -> Domain:
    """The domain a user named (see the module docstring); None: the default, CRE."""
    if isinstance(spec, Domain):
        return spec if spec.origin is not None else dataclasses.replace(spec, origin={"name": spec.name})
    spec = DEFAULT if spec is None else str(spec)
    if not spec.strip():
        raise DomainError("--domain is empty")
    if spec.endswith(".py") or Path(spec).expanduser().is_file():
        return _from_file(Path(spec))
    if spec in BUILTIN:
        return _from_module(BUILTIN[spec], f"built-in domain {spec!r}")
    entry = _entry_points().get(spec)
    if entry is not None:
        return _from_module(entry.value, f"entry point {spec!r} ({ENTRY_POINT_GROUP})")
    if all(part.isidentifier() for part in spec.partition(":")[0].split(".")):
        return _from_module(spec, f"domain {spec!r}")
    raise DomainError(f"unknown domain {spec!r}: not a built-in ({', '.join(BUILTIN)}), an installed entry point "
                      f"({', '.join(_entry_points()) or 'none'}), a module or a .py file")


def resolve_domain(spec: str | Domain | None, recorded: Mapping[str, Any] | None, where: str) -> Domain:
    """The domain a later stage runs with: the one named on the command line (`spec`), which must be
    the one `where` recorded (a bare list of records records none), or else the recorded one, found
    again without running a file; with neither, the default."""
    if recorded is not None and not (isinstance(recorded, Mapping) and isinstance(recorded.get("name"), str)):
        raise DomainError(f"{where}: the recorded domain {recorded!r} is not an object with a name")
    if spec is not None:
        domain = load_domain(spec)
        if recorded is not None and domain.name != recorded["name"]:
            advice = ("" if isinstance(spec, Domain) else
                      f" (--domain {spec}); leave --domain out, or name the domain it was made with")
            raise DomainError(f"{where} was made with domain {recorded['name']!r}, not {domain.name!r}{advice}")
        return domain
    if recorded is None:
        return load_domain(DEFAULT)
    if "module" in recorded:
        return load_domain(recorded["module"])
    if recorded["name"] in BUILTIN or recorded["name"] in _entry_points():
        return load_domain(recorded["name"])
    source = recorded.get("file")
    origin = f" from the file {source}" if source else ""
    raise DomainError(f"{where} was made with domain {recorded['name']!r}{origin}, which is not installed; a recorded "
                      f"file is never run on its own: pass --domain {source or 'PATH_TO_ITS_FILE'} to load it")


def domain_origin(domain: Domain) -> dict[str, str]:
    """What an artifact records of its domain."""
    return dict(domain.origin) if domain.origin is not None else {"name": domain.name}
