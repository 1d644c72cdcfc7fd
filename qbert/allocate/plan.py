"""Plans: a per-layer choice of formats, as a versioned JSON file that ``qbert.quantize(model, plan)`` applies.

File layout (UTF-8 JSON)::

    {
      "format": "qbert.plan",
      "version": 1,
      "layers": {                                   # module name -> LinearFormat.to_dict()
        "encoder.layer.0.attention.self.query":
            {"name": "w4a16", "weight_bits": 4, "activation_bits": null, "symmetric": false,
             "group_size": 128, "row_groups": null},
        ...
      },
      "meta": {...}                                 # free-form provenance: method, budget, model, ...
    }

Modules not listed stay in floating point. A module reachable under several names (shared weights) may
be listed under any of them; listing it twice with different formats is an error when the plan is
applied.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field

from qbert.nn.formats import LinearFormat

PLAN_FORMAT = "qbert.plan"
PLAN_VERSION = 1
_FILE_MODE = 0o644


class PlanError(ValueError):
    """A plan file or object is malformed; the message names the file (when there is one) and the problem."""


@dataclass(frozen=True)
class Plan:
    """Module name -> ``LinearFormat``; ``meta`` records how the plan was made (JSON-serializable)."""

    layers: dict[str, LinearFormat]
    meta: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name, fmt in self.layers.items():
            if not isinstance(name, str) or not isinstance(fmt, LinearFormat):
                raise PlanError(f"Plan: layers must map module names to LinearFormat, got {name!r}: {fmt!r}")

    def to_json(self) -> str:
        return json.dumps({"format": PLAN_FORMAT, "version": PLAN_VERSION,
                           "layers": {name: fmt.to_dict() for name, fmt in self.layers.items()},
                           "meta": self.meta}, indent=2)

    @classmethod
    def from_json(cls, text: str, source: str = "plan") -> Plan:
        """Parse a plan; checks the format name and version and every layer's format."""
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise PlanError(f"{source}: not valid JSON: {exc}") from exc
        if not isinstance(data, dict) or data.get("format") != PLAN_FORMAT:
            got = data.get("format") if isinstance(data, dict) else type(data).__name__
            raise PlanError(f"{source}: not a qbert plan: 'format' is {got!r}, expected {PLAN_FORMAT!r}")
        if data.get("version") != PLAN_VERSION:
            raise PlanError(f"{source}: plan version {data.get('version')!r}; this qbert reads version "
                            f"{PLAN_VERSION}")
        layers = data.get("layers")
        if not isinstance(layers, dict):
            raise PlanError(f"{source}: 'layers' must be an object mapping module names to formats")
        parsed = {}
        for name, entry in layers.items():
            try:
                parsed[name] = LinearFormat.from_dict(entry)
            except (ValueError, TypeError) as exc:
                raise PlanError(f"{source}: layer {name!r}: {exc}") from exc
        meta = data.get("meta", {})
        if not isinstance(meta, dict):
            raise PlanError(f"{source}: 'meta' must be an object")
        return cls(parsed, meta)

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
        path = os.fspath(path)
        with open(path, encoding="utf-8") as f:
            return cls.from_json(f.read(), source=path)
