"""Data files: a domain's records, checked, read and written.

A data file is either a JSON list of records (what `train data` writes for CRE, byte-identical to the
reference's files; no domain is recorded, so it reads as CRE unless `--domain` says otherwise) or an
object that names the domain that made it:

    {"format": "hmoe-jax-records", "version": 1, "domain": {"name": ..., "module" | "file": ...},
     "records": [...]}

Every record is checked before any model runs (`check_records`); an error names the file, the record
(its id, or its index) and the key.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Mapping, Sequence

from ..formulas import registered_experts
from ..runtime.files import user_path, write_json_atomically
from .domain import Domain, DomainError
from .loading import domain_origin, resolve_domain

FORMAT = "hmoe-jax-records"
FORMAT_VERSION = 1
TRAIN_FILE = "train.json"
EVAL_FILE = "eval.json"

_JSON_NAMES = {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "a list",
               dict: "an object", type(None): "null"}


def _json_name(value: Any) -> str:
    return _JSON_NAMES.get(type(value), type(value).__name__)


def _number(value: Any, key: str) -> float:
    # bool is an int in Python, but `true` is never an amount.
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise DomainError(f"key {key!r} must be a number, got {_json_name(value)}")
    if not math.isfinite(value):
        raise DomainError(f"key {key!r} is {value}: every input and output must be finite")
    return float(value)


def _of_type(record: Mapping, key: str, kind: type, where: str = "", required: bool = True) -> Any:
    if key not in record:
        if required:
            raise DomainError(f"missing key {where + key!r}")
        return None
    value = record[key]
    if isinstance(value, bool) and kind is not bool or not isinstance(value, kind):
        raise DomainError(f"key {where + key!r} must be {_JSON_NAMES[kind]}, got {_json_name(value)}")
    return value


def check_marker(marker: Any, where: str) -> None:
    """One computation marker: a registered expert, exactly its arguments, finite numbers."""
    if not isinstance(marker, dict):
        raise DomainError(f"key {where!r} must be an object, got {_json_name(marker)}")
    name = _of_type(marker, "expert", str, where + ".")
    known = {e.name: e for e in registered_experts()}
    expert = known.get(name)
    if expert is None:
        raise DomainError(f"key '{where}.expert': unknown expert {name!r} (registered: {', '.join(known)}); "
                          "is its domain loaded (--domain)?")
    expert_id = _of_type(marker, "expert_id", int, where + ".", required=False)
    if expert_id is not None and expert_id != expert.expert_id:
        raise DomainError(f"key '{where}.expert_id': {expert_id} does not match expert {name!r} "
                          f"(id {expert.expert_id})")
    inputs = _of_type(marker, "inputs", dict, where + ".")
    missing = [a for a in expert.arg_names if a not in inputs]
    extra = [a for a in inputs if a not in expert.arg_names]
    if missing or extra:
        raise DomainError(f"key '{where}.inputs': expert {name!r} takes {list(expert.arg_names)}, got "
                          f"{list(inputs)}" + (f" (missing {missing})" if missing else ""))
    for arg in expert.arg_names:
        _number(inputs[arg], f"{where}.inputs.{arg}")
    if "output" not in marker:
        raise DomainError(f"missing key '{where}.output'")
    _number(marker["output"], f"{where}.output")
    _of_type(marker, "order", int, where + ".", required=False)
    _of_type(marker, "depends_on", str, where + ".", required=False)


def check_records(records: Any, where: str) -> list[dict[str, Any]]:
    """Check a list of records (the module docstring's schema); DomainError naming `where`, the record
    and the key. Returns the records."""
    if not isinstance(records, list):
        raise DomainError(f"{where}: expected a list of records, got {_json_name(records)}")
    seen: dict[str, int] = {}
    for index, record in enumerate(records):
        if not isinstance(record, dict):
            raise DomainError(f"{where}: record #{index} must be an object, got {_json_name(record)}")
        has_id = isinstance(record.get("id"), str) and record["id"]
        label = f"record {record['id']!r}" if has_id else f"record #{index}"
        try:
            if not has_id:
                raise DomainError("key 'id' must be a non-empty string" if "id" in record else "missing key 'id'")
            if record["id"] in seen:
                raise DomainError(f"id {record['id']!r} is also record #{seen[record['id']]}'s: ids must be unique")
            seen[record["id"]] = index
            if not _of_type(record, "input_prompt", str).strip():
                raise DomainError("key 'input_prompt' is empty")
            markers = _of_type(record, "computation_markers", list)
            for i, marker in enumerate(markers):
                check_marker(marker, f"computation_markers[{i}]")
            _of_type(record, "answer", str, required=False)
            groups = _of_type(record, "groups", dict, required=False)
            for key, value in (groups or {}).items():
                if not isinstance(value, (str, int)) or isinstance(value, bool):
                    raise DomainError(f"key 'groups.{key}' must be a string or an integer, got {_json_name(value)}")
        except DomainError as err:
            raise DomainError(f"{where}: {label}: {err}") from None
    return records


def read_records(path: str | Path) -> tuple[list[dict[str, Any]], Mapping[str, str] | None]:
    """(records, the domain recorded in the file or None), the records checked (their experts must be
    registered already: `load_records` loads the domain first)."""
    content, recorded = _parse_data_file(path)
    return check_records(content, str(user_path(path))), recorded


def load_records(path: str | Path, domain: str | Domain | None = None) -> tuple[list[dict[str, Any]], Domain]:
    """(records, domain) of a data file: `domain` as named on the command line (it must be the one the
    file records, if it records one), else the recorded one, else CRE; the domain is loaded (its
    experts registered) before the records are checked."""
    content, recorded = _parse_data_file(path)
    domain = resolve_domain(domain, recorded, str(user_path(path)))
    return check_records(content, str(user_path(path))), domain


def _parse_data_file(path: str | Path) -> tuple[Any, Mapping[str, str] | None]:
    """The file's records, unchecked, and its recorded domain (None for a bare list)."""
    path = user_path(path)
    if not path.is_file():
        raise DomainError(f"{path}: no such data file")
    try:
        content = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DomainError(f"{path}: not valid JSON ({err})") from None
    recorded = None
    if isinstance(content, dict):
        if content.get("format") != FORMAT:
            raise DomainError(f"{path}: an object that is not a {FORMAT!r} file (format {content.get('format')!r})")
        if content.get("version") != FORMAT_VERSION:
            raise DomainError(f"{path}: {FORMAT} version {content.get('version')!r}, this code reads {FORMAT_VERSION}")
        recorded = content.get("domain")
        if not (isinstance(recorded, dict) and isinstance(recorded.get("name"), str)):
            raise DomainError(f"{path}: key 'domain' must be an object with a 'name'")
        content = content.get("records")
    return content, recorded


def write_records(path: str | Path, records: Sequence[Mapping[str, Any]], domain_origin: Mapping[str, str] | None
                  ) -> Path:
    """Write records atomically: a bare list when `domain_origin` is None, else the recorded format."""
    path = user_path(path)
    records = list(records)
    check_records(records, f"records for {path}")
    if domain_origin is None:
        write_json_atomically(path, records)
    else:
        write_json_atomically(path, {"format": FORMAT, "version": FORMAT_VERSION, "domain": dict(domain_origin),
                                     "records": records})
    return path


def generate_records(domain: Domain, n: int, seed: int) -> list[dict[str, Any]]:
    """`domain.generate(n, seed)`, checked: n records of the schema, each asking for at least one of the
    domain's metrics."""
    records = domain.generate(n, seed)
    where = f"domain {domain.name!r}: generate({n}, {seed})"
    if not isinstance(records, list) or len(records) != n:
        got = f"{len(records)} records" if isinstance(records, list) else _json_name(records)
        raise DomainError(f"{where} must return a list of {n} records, got {got}")
    check_records(records, where)
    idle = [r["id"] for r in records if not domain.asked(r)]
    if idle:
        raise DomainError(f"{where}: record(s) {idle[:5]} ask for none of the domain's metrics {list(domain.experts)}")
    return records


def write_dataset(domain: Domain, out_dir: str | Path, seed: int, n_train: int, n_eval: int, *,
                  overwrite: bool = False) -> tuple[Path, Path]:
    """`train.json` (the generator at `seed`) and `eval.json` (at `seed + 1`) in `out_dir`, recording the
    domain; a domain's own writer (CRE's byte-identical reference files) where it has one. Everything
    is generated and checked before either file is written.

    FileExistsError, before anything is generated, when either file exists and `overwrite` is False: a
    data set regenerated with other settings would silently replace the one a probe was trained on."""
    out_dir = user_path(out_dir)
    existing = [str(path) for path in (out_dir / TRAIN_FILE, out_dir / EVAL_FILE) if path.exists()]
    if existing and not overwrite:
        raise FileExistsError(f"refusing to overwrite {', '.join(existing)}; pass --overwrite to replace")
    if domain.write_data is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        return tuple(domain.write_data(out_dir, seed, n_train, n_eval))
    train, held_out = generate_records(domain, n_train, seed), generate_records(domain, n_eval, seed + 1)
    shared = sorted({r["id"] for r in train} & {r["id"] for r in held_out})
    if shared:
        raise DomainError(f"domain {domain.name!r}: seeds {seed} and {seed + 1} generate the same id(s) "
                          f"{shared[:5]}: make ids depend on the seed")
    out_dir.mkdir(parents=True, exist_ok=True)
    origin = domain_origin(domain)
    return (write_records(out_dir / TRAIN_FILE, train, origin), write_records(out_dir / EVAL_FILE, held_out, origin))
