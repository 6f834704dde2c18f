"""The run report (interface.md section 5) and the one-line-per-change log (section 6).

Every change the shim makes to a user's run goes through `Report.change`, which logs it once at INFO on the
`mps_shim` logger and records it; events go through `Report.event`. With a report path, the JSON is rewritten after
each change and event, and at exit, so a crash still leaves a report.
"""
from __future__ import annotations

import json
import logging
import os

from mps_shim._version import __version__

TYPE_CHECKING = False  # typing itself is not imported: `import mps_shim` runs at the start of every process
if TYPE_CHECKING:
    from typing import Any

log = logging.getLogger("mps_shim")

LOG_LEVELS = {"quiet": logging.WARNING, "info": logging.INFO, "debug": logging.DEBUG}


def configure_logging(level: str) -> None:
    """One stderr handler on the `mps_shim` logger; records do not also go to the script's root handlers."""
    if not any(getattr(h, "_mps_shim", False) for h in log.handlers):
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("mps-shim: %(message)s"))
        handler._mps_shim = True
        log.addHandler(handler)
    log.setLevel(LOG_LEVELS[level])
    log.propagate = False


def _jsonable(value: Any) -> Any:
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    return str(value)


class Report:
    def __init__(self, path: str | None):
        self.path = path
        self.data: dict[str, Any] = {
            "shim_version": __version__,
            "active": True,
            "device": {},
            "precision": {},
            "changes": [],
            "batch": {},
            "memory": {"budget_bytes": None, "estimated_peak_bytes": None, "measured_peak_bytes": None},
            "events": [],
            "patches": {},
            "notes": [],
        }
        self._logged: set[tuple] = set()
        # A process that only launches others (torchrun's agent, the prefix command) has nothing to report and must
        # not overwrite the report of the process that trains.
        self.worth_writing = False

    def change(self, target: str, from_: Any, to: Any, reason: str) -> None:
        """Record and log one change to the user's run (once per distinct change)."""
        key = (target, repr(from_), repr(to))
        if key in self._logged:
            return
        self._logged.add(key)
        self.data["changes"].append(
            {"target": target, "from": _jsonable(from_), "to": _jsonable(to), "reason": reason}
        )
        log.info("%s %s -> %s (%s)", target, show_value(from_), show_value(to), reason)
        self.worth_writing = True
        self.write()

    def event(self, kind: str, detail: str, step: int | None = None, level: int = logging.WARNING) -> None:
        self.data["events"].append({"kind": kind, "step": step, "detail": detail})
        log.log(level, "%s%s: %s", kind, "" if step is None else f" at step {step}", detail)
        self.worth_writing = True
        self.write()

    def note(self, text: str, level: int = logging.INFO) -> None:
        """A fact about the run that is not a change (said once), e.g. what could not be set in time."""
        if text in self.data["notes"]:
            return
        self.data["notes"].append(text)
        log.log(level, "%s", text)

    def update(self, section: str, values: dict[str, Any]) -> None:
        merged = {**self.data.get(section, {}), **_jsonable(values)}
        if merged != self.data.get(section):
            self.data[section] = merged
            self.write()  # e.g. the batch plan, set after the change that caused it: a crash must still leave it

    def record_patch(self, name: str, status: str) -> None:
        """What became of one patch: "applied", "not needed" or "skipped: <why>" (the report's `patches`)."""
        self.data["patches"][name] = status

    def set_active(self, flag: bool) -> None:
        """Whether the shim is on in this process (False after `deactivate()`); written at once."""
        self.data["active"] = bool(flag)
        self.write()

    def document(self) -> dict[str, Any]:
        """The report as written: `data`, with the keys derived from other sections filled in."""
        device = self.data.get("device")
        if not device:
            return self.data
        # interface.md section 5 has the budget in `device` as well as in `memory`; one value, kept in `memory`.
        return {**self.data, "device": {**device, "memory_budget_bytes": self.data["memory"].get("budget_bytes")}}

    def as_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(self.document()))

    def write(self, always: bool = False) -> None:
        """Write the report to its path, if it has one. A report without any change or event is written only when
        `always` (e.g. by `mps-shim plan`), so a process that only launches others leaves nothing."""
        if always:
            self.worth_writing = True
        if not self.path or not self.worth_writing:
            return
        import tempfile  # only a process that writes a report pays for it

        folder = os.path.dirname(os.path.abspath(self.path))
        os.makedirs(folder, exist_ok=True)
        # Write-then-rename, so a reader (or a crash) never sees half a file.
        handle, temporary = tempfile.mkstemp(dir=folder, prefix=".mps-shim-report.")
        with os.fdopen(handle, "w") as stream:
            json.dump(self.document(), stream, indent=2, ensure_ascii=False)
        os.replace(temporary, self.path)


def gib(size: int | None) -> str:
    return "unknown" if size is None else f"{size / 2**30:.2f} GiB"


def show_value(value: Any) -> str:
    """How a changed value is written in the log: strings as they are, anything else as its repr."""
    return value if isinstance(value, str) and value else repr(value)


def render_plan(data: dict[str, Any]) -> str:
    """`mps-shim plan`: every change and the precision, batch and memory plan, as lines a person reads."""
    precision, batch, memory = data["precision"], data["batch"], data["memory"]
    lines = ["mps-shim plan (no training was run)"]
    lines += [f"  change: {c['target']}: {show_value(c['from'])} -> {show_value(c['to'])} ({c['reason']})" for c in data["changes"]]
    if precision:
        lines.append(
            f"  precision: {precision['chosen']} (asked {precision['requested']}), frozen weights "
            f"{precision['weights_dtype']}, trainable {precision['trainable_dtype']}, autocast "
            f"{precision['autocast_dtype']}, loss scaling {'on' if precision['loss_scaling'] else 'off'}: "
            f"{precision['reason']}"
        )
    if batch:
        lines.append(
            f"  batch: micro-batch {batch['micro_batch']} x accumulation {batch['gradient_accumulation_steps']} x "
            f"{batch['world_size']} process(es) = effective {batch['effective_batch']}"
        )
    lines.append(
        f"  memory: estimated peak {gib(memory['estimated_peak_bytes'])} of budget {gib(memory['budget_bytes'])}"
    )
    return "\n".join(lines)
