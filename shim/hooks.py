"""Post-import hooks: run a function when a module finishes importing, or at once if it already has.

The same contract as `wrapt.register_post_import_hook`, in a few lines of our own because importing wrapt 2.x costs
about 70 ms (it pulls in asyncio) and `import mps_shim` runs at the start of every process of a shimmed
environment. wrapt itself is still what wraps the patched functions, imported when the first patch applies.
"""
from __future__ import annotations

import sys
import threading

TYPE_CHECKING = False  # typing itself is not imported: `import mps_shim` runs at the start of every process
if TYPE_CHECKING:
    from typing import Callable

_hooks: dict[str, list[Callable]] = {}
_lock = threading.RLock()


def when_imported(name: str, hook: Callable) -> None:
    """Call hook(module) once `name` is imported; now if it already is."""
    with _lock:
        module = sys.modules.get(name)
        if module is None:
            _hooks.setdefault(name, []).append(hook)
            if not any(isinstance(finder, _PostImportFinder) for finder in sys.meta_path):
                sys.meta_path.insert(0, _PostImportFinder())
            return
    hook(module)


def _fire(name: str, module) -> None:
    with _lock:
        hooks = _hooks.pop(name, [])
    for hook in hooks:
        hook(module)


class _LoaderWithHooks:
    # Duck-typed, like the finder below: importlib.abc is too costly to import here.
    def __init__(self, loader):
        self.loader = loader

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module):
        self.loader.exec_module(module)
        _fire(module.__name__, sys.modules.get(module.__name__, module))

    def __getattr__(self, name):  # get_resource_reader, is_package, get_code ...: whatever the real loader offers
        return getattr(self.loader, name)


class _PostImportFinder:
    def find_spec(self, fullname, path=None, target=None):
        if fullname not in _hooks:
            return None
        spec = _find_elsewhere(fullname, path, target)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        spec.loader = _LoaderWithHooks(spec.loader)
        return spec


def _find_elsewhere(fullname, path, target):
    """The spec the other finders would give."""
    for finder in sys.meta_path:
        if isinstance(finder, _PostImportFinder) or not hasattr(finder, "find_spec"):
            continue
        spec = finder.find_spec(fullname, path, target)
        if spec is not None:
            return spec
    return None
