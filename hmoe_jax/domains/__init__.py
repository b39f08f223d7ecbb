"""Domains: a researcher's formulas, how their answers read, and the data that exercises them.

A domain is one `Domain` object in one module (`domain`): its metrics (each a registered deterministic
expert with its answer line, sanity range, how its arguments are written in a prompt and how its probes
scale their targets), a generator of records, router negatives and report groupings. Built in: `cre`
(the reference's commercial real estate underwriting, the default) and `circuits`. Every command takes
`--domain` (`loading`): a built-in name, an installed entry point (group `hmoe_jax.domains`), a module,
or a `.py` file. `records` reads and writes data files of any domain; `scaling` is the probes' target
spaces.
"""

from .domain import OUTPUT, Domain, DomainError, Metric
from .loading import BUILTIN, DEFAULT, ENTRY_POINT_GROUP, domain_origin, load_domain, resolve_domain
from .records import (
    EVAL_FILE,
    TRAIN_FILE,
    check_records,
    generate_records,
    load_records,
    read_records,
    write_dataset,
    write_records,
)
from .scaling import SIGN_LOG, Scaling, linear, sign_log

__all__ = [
    "BUILTIN",
    "DEFAULT",
    "Domain",
    "DomainError",
    "ENTRY_POINT_GROUP",
    "EVAL_FILE",
    "Metric",
    "OUTPUT",
    "SIGN_LOG",
    "Scaling",
    "TRAIN_FILE",
    "check_records",
    "domain_origin",
    "generate_records",
    "linear",
    "load_domain",
    "load_records",
    "read_records",
    "resolve_domain",
    "sign_log",
    "write_dataset",
    "write_records",
]
