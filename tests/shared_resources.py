"""Expensive test resources (a two-node Ray cluster, a Ray Serve instance, an application on it) shared by
the test modules that use them, one after another: started by the first test that asks, stopped as soon
as the next test belongs to a module that does not use it (`tests/conftest.py`, which also runs the
modules that use one back to back).

Why not a session fixture: pytest keeps those to the end of the session, where an idle cluster or
Serve would cost every later test CPU on a 2-core machine; a module fixture starts one per module
(a cluster 15-30 s, Serve 8-10 s of start and stop on that machine, an application's deployment 15-30 s).
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, ExitStack
from typing import Generic, TypeVar

import pytest

T = TypeVar("T")


class SharedResource(Generic[T]):
    """A context manager's value, entered on the first `get` (`start(*args)`, the first get's `args`) and exited by
    `close`; `modules` are the test modules that use it (set at collection)."""

    def __init__(self, start: Callable[..., AbstractContextManager[T]]):
        self._start = start
        self._stack: ExitStack | None = None
        self._value: T | None = None
        self.modules: set[object] = set()

    def get(self, *args: object) -> T:
        if self._stack is None:
            with ExitStack() as stack:
                self._value = stack.enter_context(self._start(*args))
                self._stack = stack.pop_all()
        return self._value  # type: ignore[return-value]

    def close(self) -> None:
        stack, self._stack, self._value = self._stack, None, None
        if stack is not None:
            stack.close()


def group_users(items: list[pytest.Item], fixture: str, resource: SharedResource) -> None:
    """Note the modules whose tests use `fixture` and reorder `items` in place so that they run back to
    back, from where the first of them stands; every other module, and the order inside a module, is kept."""
    modules: dict[object, list[pytest.Item]] = {}
    for item in items:
        modules.setdefault(item.module, []).append(item)
    users = [m for m, its in modules.items() if any(fixture in i.fixturenames for i in its)]
    resource.modules = set(users)
    if not users:
        return
    ordered: list[pytest.Item] = []
    for module, its in modules.items():
        if module is users[0]:
            ordered += [i for m in users for i in modules[m]]
        elif module not in resource.modules:
            ordered += its
    items[:] = ordered


def close_unless_next_uses(resources: dict[str, SharedResource], nextitem: pytest.Item | None) -> None:
    """Stop each shared resource that the next test's module (None: no next test) does not use: a
    module's tests share one value of a module fixture, also those that do not ask for it."""
    for resource in resources.values():
        if nextitem is None or nextitem.module not in resource.modules:
            resource.close()
