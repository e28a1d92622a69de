"""`memtune.estimate(...)` and `memtune.fit(...)` are functions of the public API, and
`memtune.estimate` / `memtune.fit` are also modules (the estimator, the planner). Python binds a
submodule as an attribute of its package once it is imported, which would hide the function; so
those two modules are made callable, each call going to the API function of the same name."""

from __future__ import annotations

import sys
import types


class _CallableModule(types.ModuleType):
    def __call__(self, *args, **kwargs):
        from memtune import api

        return getattr(api, self.__name__.rsplit(".", 1)[1])(*args, **kwargs)


def make_callable(module_name: str) -> None:
    sys.modules[module_name].__class__ = _CallableModule
