"""Where a benchmark's result goes: `<out>/<device>-<date>-<name>.json`, the device's name with dashes
for spaces ("cpu" where the result names none), the date the result carries."""
import json
import os


def write(result: dict, out: str, name: str, device: str | None = None, indent: int = 2) -> str:
    """Write `result` as JSON (values JSON lacks as their str) and print and return its path."""
    device = (device or result.get("device") or "cpu").replace(" ", "-")
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, f"{device}-{result['date']}-{name}.json")
    with open(path, "w") as f:
        f.write(json.dumps(result, indent=indent, default=str) + "\n")
    print("wrote", path, flush=True)
    return path
