"""The benches' one output format: a `key  value` table on stdout, and the same as JSON on request."""

import json
from typing import Optional


def report(res: dict, path: Optional[str] = None) -> int:
    width = max(map(len, res))
    for k, v in res.items():
        print(f"{k.ljust(width)}  {v}")
    if path:
        with open(path, "w") as f:
            json.dump(res, f, indent=2)
    return 0
