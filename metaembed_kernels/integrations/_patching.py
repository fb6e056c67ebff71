"""Reversible rebinding of a host library's functions wherever the host imported them by name.

A host that does ``from ..scores import colbert_scores`` holds its own reference in the importing
module's namespace, and a default argument (``def __init__(self, score_metric=colbert_kd_scores)``)
holds another in the function's ``__defaults__``. Patching only the defining module misses both.
``Patcher`` therefore scans every loaded module of the host package for attributes and default
values that *are* (by identity) one of the originals, rebinds them, and records what it changed so
that ``unpatch()`` restores the very same objects. Modules of the host imported while patched copy
the replacement by name; ``unpatch()`` finds those too by a second scan for the replacements.
"""
from __future__ import annotations

import importlib
import inspect
import sys
import threading
from typing import Callable, Dict, Iterable, List, Tuple


def _host_modules(prefix: str):
    for name, module in list(sys.modules.items()):
        if module is not None and (name == prefix or name.startswith(prefix + ".")):
            yield module


def _functions_with_defaults(module) -> Iterable:
    """Functions defined in ``module`` and the methods of its classes (where defaults live)."""
    for value in list(vars(module).values()):
        if inspect.isfunction(value) and value.__module__ == module.__name__:
            yield value
        elif inspect.isclass(value) and value.__module__ == module.__name__:
            for member in list(vars(value).values()):
                fn = getattr(member, "__func__", member)  # staticmethod / classmethod
                if inspect.isfunction(fn):
                    yield fn


class Patcher:
    """Swaps ``originals[i]`` for ``replacements[i]`` throughout the host package ``prefix``.

    Args:
        prefix: the host's top-level package name ("pylate").
        modules: host modules to import before scanning, so that their by-name imports are
            rebound now (a module that fails to import, e.g. for a missing optional dependency,
            is skipped: if it is imported later it copies the already-patched names).
        pairs: callable returning ``[(original, replacement), ...]``; called at patch time, so
            that the host is imported only then.
        attributes: callable returning ``[(owner, attribute_name, replacement), ...]`` for
            attributes rebound directly (class methods); the original is read from
            ``owner.__dict__`` so that descriptors (staticmethod) come back unchanged.
    """

    def __init__(self, prefix: str, modules: Tuple[str, ...], pairs: Callable[[], List[tuple]],
                 attributes: Callable[[], List[tuple]] = lambda: []):
        self.prefix = prefix
        self.modules = modules
        self.pairs = pairs
        self.attributes = attributes
        self._lock = threading.Lock()
        self._records: List[tuple] = []  # (kind, owner, key, original)
        self._swap: Dict[int, tuple] = {}  # id(original) -> (original, replacement)
        self._active = False

    @property
    def active(self) -> bool:
        return self._active

    def patch(self) -> None:
        with self._lock:
            if self._active:
                return  # idempotent: a second patch() changes nothing
            for name in self.modules:
                try:
                    importlib.import_module(name)
                except ImportError:
                    pass
            pairs = self.pairs()
            self._swap = {id(orig): (orig, new) for orig, new in pairs}
            for owner, key, new in self.attributes():
                self._records.append(("attr", owner, key, owner.__dict__[key]))
                setattr(owner, key, new)
            for module in _host_modules(self.prefix):
                for key, value in list(vars(module).items()):
                    hit = self._swap.get(id(value))
                    if hit is not None and hit[0] is value:
                        self._records.append(("attr", module, key, value))
                        setattr(module, key, hit[1])
                for fn in _functions_with_defaults(module):
                    self._patch_defaults(fn)
            self._active = True

    def _patch_defaults(self, fn) -> None:
        defaults = fn.__defaults__
        if defaults and any(id(d) in self._swap and self._swap[id(d)][0] is d for d in defaults):
            self._records.append(("defaults", fn, "__defaults__", defaults))
            fn.__defaults__ = tuple(self._swap[id(d)][1] if id(d) in self._swap else d for d in defaults)
        kwdefaults = fn.__kwdefaults__
        if kwdefaults and any(id(d) in self._swap and self._swap[id(d)][0] is d for d in kwdefaults.values()):
            self._records.append(("defaults", fn, "__kwdefaults__", kwdefaults))
            fn.__kwdefaults__ = {k: self._swap[id(d)][1] if id(d) in self._swap else d
                                 for k, d in kwdefaults.items()}

    def unpatch(self) -> None:
        with self._lock:
            if not self._active:
                return
            for kind, owner, key, original in reversed(self._records):
                setattr(owner, key, original)
            # Host modules first imported while patched copied replacements by name.
            back = {id(new): orig for orig, new in self._swap.values()}
            for module in _host_modules(self.prefix):
                for key, value in list(vars(module).items()):
                    if id(value) in back:
                        setattr(module, key, back[id(value)])
                for fn in _functions_with_defaults(module):
                    if fn.__defaults__ and any(id(d) in back for d in fn.__defaults__):
                        fn.__defaults__ = tuple(back.get(id(d), d) for d in fn.__defaults__)
                    if fn.__kwdefaults__ and any(id(d) in back for d in fn.__kwdefaults__.values()):
                        fn.__kwdefaults__ = {k: back.get(id(d), d) for k, d in fn.__kwdefaults__.items()}
            self._records = []
            self._swap = {}
            self._active = False
