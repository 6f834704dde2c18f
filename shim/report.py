"""The run report and the one-line-per-change log (docs/user-contract.md, "The report").

Every change the shim makes to a user's run goes through `Report.change`, which logs it once at INFO on the
`mps_shim` logger and records it; events go through `Report.event`. With a report path, the JSON is rewritten after
each change and event, and at exit, so a crash still leaves a report.

One run can be several processes (a launcher such as `accelerate launch` and the process it starts): they share a run
id (MPS_SHIM_RUN, inherited) and write one document. Each write merges under a lock on the report's folder: the
changes, events and notes of every process, and the sections (device, precision, batch, memory) of the process that
got furthest into training. Writing never stops a run: a failure is one warning.
"""
from __future__ import annotations

import os

from mps_shim._version import __version__
from mps_shim.log import INFO, WARNING, emit
from mps_shim.units import size_text

TYPE_CHECKING = False  # typing itself is not imported: `import mps_shim` runs at the start of every process
if TYPE_CHECKING:
    from typing import Any


# Shared by the processes of one run (each inherits it): their reports at one path merge instead of replacing.
RUN_VARIABLE = "MPS_SHIM_RUN"



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
        # A process that changed nothing (a launcher) writes nothing.
        self.worth_writing = False
        self._run = new_run_id() if path else None
        self._swept = False  # stale temporary files beside the report are removed once per process
        self._write_failed = False

    def change(self, target: str, from_: Any, to: Any, reason: str) -> None:
        """Record and log one change to the user's run (once per distinct change)."""
        key = (target, repr(from_), repr(to))
        if key in self._logged:
            return
        self._logged.add(key)
        self.data["changes"].append(
            {"target": target, "from": _jsonable(from_), "to": _jsonable(to), "reason": reason}
        )
        emit(INFO, "%s %s -> %s (%s)", target, show_value(from_), show_value(to), reason)
        self.worth_writing = True
        self.write()

    def event(self, kind: str, detail: str, step: int | None = None, level: int = WARNING) -> None:
        self.data["events"].append({"kind": kind, "step": step, "detail": detail})
        emit(level, "%s%s: %s", kind, "" if step is None else f" at step {step}", detail)
        self.worth_writing = True
        self.write()

    def note(self, text: str, level: int = INFO) -> None:
        """A fact about the run that is not a change (said once), e.g. what could not be set in time."""
        if text in self.data["notes"]:
            return
        self.data["notes"].append(text)
        emit(level, "%s", text)

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
        """This process's report: `data`, with the keys derived from other sections filled in, and the run and the
        process it belongs to (with how many of the changes and events are its own)."""
        import sys

        process = {
            "pid": os.getpid(),
            "argv": list(sys.argv),
            "stage": self._stage(),
            "change_count": len(self.data["changes"]),
            "event_count": len(self.data["events"]),
        }
        document = {**self.data, "run": self._run, "processes": [process]}
        device = self.data.get("device")
        if device:
            # The budget is in `device` as well as in `memory`; one value, kept in `memory`.
            document["device"] = {**device, "memory_budget_bytes": self.data["memory"].get("budget_bytes")}
        return document

    def _stage(self) -> int:
        """How far this process got towards training: 2 batch planned, 1 precision decided, 0 neither (a launcher)."""
        return 2 if self.data.get("batch") else 1 if self.data.get("precision") else 0

    def as_dict(self) -> dict[str, Any]:
        import json  # only a process that reads or writes its report pays for it

        return json.loads(json.dumps(self.document()))

    def write(self, always: bool = False) -> None:
        """Write the report to its path, if it has one. A report without any change or event is written only when
        `always` (e.g. by `mps-shim plan`), so a process that only launches others leaves nothing. A failure is one
        warning, and the run goes on."""
        if always:
            self.worth_writing = True
        if not self.path or not self.worth_writing:
            return
        try:
            folder = os.path.dirname(os.path.abspath(self.path))
            os.makedirs(folder, exist_ok=True)
            with _FolderLock(folder):
                if not self._swept:
                    remove_stale_temporaries(self.path)
                    self._swept = True
                write_json(self.path, merge_reports(read_report(self.path), self.document()))
        except (OSError, TypeError, ValueError) as error:
            if not self._write_failed:
                self._write_failed = True
                emit(WARNING, "cannot write the report to %s (%s); the run goes on without it", self.path, error)


def new_run_id() -> str:
    """The run this process belongs to: inherited from the process that started it, or a new one passed on."""
    import time

    return os.environ.setdefault(RUN_VARIABLE, f"{os.getpid()}-{time.time_ns()}")


def merge_reports(on_disk: dict[str, Any] | None, own: dict[str, Any]) -> dict[str, Any]:
    """The document at the report's path once this process has written: its own report (`document()`), merged with
    what another process of the same run wrote there. A report of another run is replaced.

    Changes and events: every process's, process after process in the order they first wrote (each process says how
    many are its own). Notes: every distinct one. Sections (device, precision, batch, memory, patches, active): from
    the process that got furthest towards training (`stage`; a later process wins a tie), so a launcher that writes
    at its exit never hides the training process.
    """
    try:
        if on_disk.get("run") != own["run"] or not isinstance(on_disk["processes"], list):
            return own
        me = own["processes"][0]
        processes = [me if entry["pid"] == me["pid"] else entry for entry in on_disk["processes"]]
        if me not in processes:
            processes.append(me)
        _, leader = max((entry["stage"], index) for index, entry in enumerate(processes))
        merged = dict(own if processes[leader] is me else on_disk)
        for key, count in (("changes", "change_count"), ("events", "event_count")):
            written, start = {}, 0
            for entry in on_disk["processes"]:
                written[entry["pid"]], start = on_disk[key][start:start + entry[count]], start + entry[count]
            if start != len(on_disk[key]):
                raise ValueError("the counts do not add up")
            merged[key] = [
                item for entry in processes for item in (own[key] if entry is me else written[entry["pid"]])
            ]
        merged["notes"] = [*on_disk["notes"], *(note for note in own["notes"] if note not in on_disk["notes"])]
    except (AttributeError, KeyError, TypeError, ValueError):
        return own  # not a report this version wrote: replaced
    merged["run"], merged["processes"] = own["run"], processes
    return merged


def read_report(path: str) -> dict[str, Any] | None:
    import json

    try:
        with open(path, encoding="utf-8") as stream:
            document = json.load(stream)
    except (OSError, ValueError):
        return None
    return document if isinstance(document, dict) else None


def _temporary_name(path: str, purpose: str) -> str:
    """`.report.json.<pid>-<purpose>.tmp` beside the report: the pid tells whose it is once that process is gone."""
    folder, name = os.path.split(os.path.abspath(path))
    return os.path.join(folder, f".{name}.{os.getpid()}-{purpose}.tmp")


def write_json(path: str, document: Any) -> None:
    """Write JSON to path whole or not at all (write, then rename), created like any output file: the user's umask
    decides its mode."""
    import _thread
    import json

    temporary = _temporary_name(path, str(_thread.get_ident()))
    if os.path.lexists(temporary):
        os.unlink(temporary)  # left by a process that had our pid before us
    handle = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as stream:
            json.dump(document, stream, indent=2, ensure_ascii=False)
        os.replace(temporary, path)
    except BaseException:
        if os.path.lexists(temporary):
            os.unlink(temporary)
        raise


def remove_stale_temporaries(path: str) -> None:
    """Remove the temporary files beside the report that processes left when they were killed mid-write."""
    folder, name = os.path.split(os.path.abspath(path))
    prefix = f".{name}."
    for entry in os.listdir(folder):
        pid = entry[len(prefix):].split("-")[0] if entry.startswith(prefix) and entry.endswith(".tmp") else ""
        if pid.isdigit() and not _alive(int(pid)):
            try:
                os.unlink(os.path.join(folder, entry))
            except OSError:
                pass


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # exists, but not ours to signal
    return True


def unwritable(path: str) -> str | None:
    """Why a file cannot be written at path, or None. Tried for real, by creating and removing a file in the nearest
    folder that exists, since permission bits do not tell (root ignores them; /proc and /sys refuse anyway)."""
    folder = os.path.dirname(os.path.abspath(path))
    while not os.path.lexists(folder):
        folder = os.path.dirname(folder)
    if not os.path.isdir(folder):
        return f"{folder} is a file, not a folder"
    probe = os.path.join(folder, os.path.basename(_temporary_name(path, "probe")))
    try:
        os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        os.unlink(probe)
    except OSError as error:
        return f"creating a file in {folder} fails: {error.strerror}"
    return None


class _FolderLock:
    """An exclusive lock on the report's folder while one process merges and writes (flock; none where there is no
    fcntl). Closing the folder releases it, also when the process dies."""

    def __init__(self, folder: str):
        self.folder = folder
        self.handle = None

    def __enter__(self):
        try:
            import fcntl

            self.handle = os.open(self.folder, os.O_RDONLY)
            fcntl.flock(self.handle, fcntl.LOCK_EX)
        except (ImportError, OSError):
            pass  # no lock: concurrent writers may each miss the other's latest entries until their next write
        return self

    def __exit__(self, *exc):
        if self.handle is not None:
            os.close(self.handle)


def show_value(value: Any) -> str:
    """How a changed value is written in the log: strings as they are, anything else as its repr."""
    return value if isinstance(value, str) and value else repr(value)


def render_plan(data: dict[str, Any]) -> str:
    """`mps-shim plan`: every change and the precision, batch and memory plan, as lines a person reads."""
    precision, batch, memory = data["precision"], data["batch"], data["memory"]
    lines = ["mps-shim plan (no training was run)"]
    lines += [
        f"  change: {c['target']}: {show_value(c['from'])} -> {show_value(c['to'])} ({c['reason']})"
        for c in data["changes"]
    ]
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
    if memory.get("diagnosis"):
        lines.append(f"  memory: {memory['diagnosis']}")
    else:
        lines.append(
            f"  memory: estimated peak {size_text(memory['estimated_peak_bytes'])} of budget "
            f"{size_text(memory['budget_bytes'])}"
        )
    return "\n".join(lines)
