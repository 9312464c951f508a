"""Which MoE model types of transformers reapsurgery supports, as the census measured them.

`python -m fixtures.census --write` runs every MoE model type of the installed transformers through
calibrate, plan, apply, verify and loading, and keeps the result in census.json (shipped with the
package, with the transformers version it was measured with); the README's support table is
generated from the same file. Read here without torch or transformers, for `reapsurgery architectures`.
"""

from __future__ import annotations

import json
from importlib import metadata, resources
from typing import Any

STATUSES = ("supported", "refused", "not run", "fails")


def census() -> dict[str, Any]:
    """{"transformers": version, "date": ..., "model_types": {model_type: {"class", "status", "layout" | "reason"}}}."""
    return json.loads(resources.files(__package__).joinpath("census.json").read_text())


def by_status(data: dict[str, Any]) -> dict[str, dict[str, dict]]:
    """The census' model types grouped by status, in STATUSES order."""
    return {st: {mt: e for mt, e in data["model_types"].items() if e["status"] == st} for st in STATUSES}


def installed_transformers() -> str | None:
    """The installed transformers' version (from its metadata: nothing imported), None without one."""
    try:
        return metadata.version("transformers")
    except metadata.PackageNotFoundError:
        return None
