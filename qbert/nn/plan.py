"""Plans: a per-layer choice of formats, as a versioned JSON file that ``qbert.quantize(model, plan)`` applies.

File layout (UTF-8 JSON)::

    {
      "format": "qbert.plan",
      "version": 2,
      "layers": {                                   # module name -> LinearFormat.to_dict()
        "encoder.layer.0.attention.self.query":
            {"name": "w4a16", "weight_bits": 4, "activation_bits": null, "symmetric": false,
             "group_size": 128, "row_groups": null},
        ...
      },
      "rounding": {                                 # optional: module name -> Rounding.to_dict()
        "encoder.layer.0.attention.self.query":
            {"method": "gptq", "damp": 0.01, "block_size": 128, "act_order": false},
        ...
      },
      "meta": {...}                                 # free-form provenance: method, budget, model, ...
    }

Version 2 added ``rounding`` (``qbert.nn.Rounding``: GPTQ or round to nearest per layer; a layer not
listed takes ``qbert.quantize``'s ``rounding`` argument); version 1 files, which have none, still load.
Modules not listed stay in floating point. A module reachable under several names (shared weights) may
be listed under any of them; listing it twice with different formats is an error when the plan is
applied.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections import Counter
from dataclasses import dataclass, field

from qbert.nn.formats import LinearFormat
from qbert.nn.gptq import Rounding

PLAN_FORMAT = "qbert.plan"
PLAN_VERSION = 2
READABLE_VERSIONS = (1, PLAN_VERSION)  # version 1: no rounding
_FILE_MODE = 0o644


class PlanError(ValueError):
    """A plan file or object is malformed; the message names the file (when there is one) and the problem."""


@dataclass(frozen=True)
class Plan:
    """Module name -> ``LinearFormat``; ``rounding``: module name -> ``Rounding`` for some of those layers
    (the others take ``qbert.quantize``'s ``rounding``); ``meta`` records how the plan was made
    (JSON-serializable)."""

    layers: dict[str, LinearFormat]
    meta: dict = field(default_factory=dict)
    rounding: dict[str, Rounding] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.layers, dict):
            raise PlanError(f"Plan: layers must be a dict of module name -> LinearFormat, got "
                            f"{type(self.layers).__name__}")
        for name, fmt in self.layers.items():
            if not isinstance(name, str) or not isinstance(fmt, LinearFormat):
                raise PlanError(f"Plan: layers must map module names to LinearFormat, got {name!r}: {fmt!r}")
        if not isinstance(self.meta, dict):
            raise PlanError(f"Plan: meta must be a dict, got {type(self.meta).__name__}")
        if not isinstance(self.rounding, dict):
            raise PlanError(f"Plan: rounding must be a dict of module name -> qbert.nn.Rounding, got "
                            f"{type(self.rounding).__name__}")
        for name, rounding in self.rounding.items():
            if not isinstance(rounding, Rounding):
                raise PlanError(f"Plan: rounding must map module names to qbert.nn.Rounding, got {name!r}: "
                                f"{rounding!r}")
            if name not in self.layers:
                raise PlanError(f"Plan: rounding names {name!r}, which the plan gives no format")

    def to_json(self) -> str:
        return json.dumps({"format": PLAN_FORMAT, "version": PLAN_VERSION,
                           "layers": {name: fmt.to_dict() for name, fmt in self.layers.items()},
                           "rounding": {name: r.to_dict() for name, r in self.rounding.items()},
                           "meta": self.meta}, indent=2)

    @classmethod
    def from_json(cls, text: str, source: str = "plan") -> Plan:
        """Parse a plan; checks the format name and version and every layer's format (``LinearFormat``'s
        checks: every field, of its type, in a combination an op serves). A key repeated in one object,
        JSON that is not valid or nested too deeply to parse is a ``PlanError`` naming ``source``."""
        try:
            data = json.loads(text, object_pairs_hook=_unique_keys)
        except _RepeatedKeys as exc:
            raise PlanError(f"{source}: {exc}") from exc
        except RecursionError as exc:
            raise PlanError(f"{source}: not a plan: JSON nested too deeply to parse") from exc
        except ValueError as exc:  # json.JSONDecodeError, and int's limit on digits
            raise PlanError(f"{source}: not valid JSON: {exc}") from exc
        if not isinstance(data, dict) or data.get("format") != PLAN_FORMAT:
            got = data.get("format") if isinstance(data, dict) else type(data).__name__
            raise PlanError(f"{source}: not a qbert plan: 'format' is {got!r}, expected {PLAN_FORMAT!r}")
        if data.get("version") not in READABLE_VERSIONS:
            raise PlanError(f"{source}: plan version {data.get('version')!r}; this qbert reads versions "
                            f"{', '.join(map(str, READABLE_VERSIONS))}")
        layers = data.get("layers")
        if not isinstance(layers, dict):
            raise PlanError(f"{source}: 'layers' must be an object mapping module names to formats")
        parsed = _parse_entries(layers, LinearFormat.from_dict, f"{source}: layer")
        meta = data.get("meta", {})
        if not isinstance(meta, dict):
            raise PlanError(f"{source}: 'meta' must be an object")
        rounding = data.get("rounding", {})
        if data["version"] == 1 and "rounding" in data:
            raise PlanError(f"{source}: a version 1 plan has no 'rounding' (version 2 added it)")
        if not isinstance(rounding, dict):
            raise PlanError(f"{source}: 'rounding' must be an object mapping module names to roundings")
        parsed_rounding = _parse_entries(rounding, Rounding.from_dict, f"{source}: rounding of")
        try:
            return cls(parsed, meta, parsed_rounding)
        except PlanError as exc:
            raise PlanError(f"{source}: {exc}") from exc

    def save(self, path: str | os.PathLike) -> None:
        """Write the plan to ``path`` atomically (a failed write leaves an earlier file intact)."""
        path = os.fspath(path)
        text = self.to_json()
        fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp",
                                   dir=os.path.dirname(os.path.abspath(path)))
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(text)
                f.flush()
                os.fsync(f.fileno())
            os.chmod(tmp, _FILE_MODE)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)

    @classmethod
    def load(cls, path: str | os.PathLike) -> Plan:
        """Read the plan file ``path`` (UTF-8 JSON; see ``from_json`` for the checks)."""
        path = os.fspath(path)
        with open(path, "rb") as f:
            raw = f.read()
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise PlanError(f"{path}: not a plan: not UTF-8 text ({exc})") from exc
        return cls.from_json(text, source=path)


def _parse_entries(entries: dict, parse, where: str) -> dict:
    """``{name: parse(entry)}``; an entry ``parse`` refuses is a ``PlanError`` ``"<where> 'name': <why>"``."""
    parsed = {}
    for name, entry in entries.items():
        try:
            parsed[name] = parse(entry)
        except (ValueError, TypeError) as exc:
            raise PlanError(f"{where} {name!r}: {exc}") from exc
    return parsed


class _RepeatedKeys(ValueError):
    """A JSON object repeats a key (json keeps the last one silently); raised while parsing."""


def _unique_keys(pairs: list[tuple[str, object]]) -> dict:
    repeated = sorted(key for key, count in Counter(key for key, _ in pairs).items() if count > 1)
    if repeated:
        raise _RepeatedKeys(f"a JSON object repeats the keys {repeated} (each key may appear once)")
    return dict(pairs)
