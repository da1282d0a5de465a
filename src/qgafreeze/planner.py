"""Dependency order for the two phases.

``shop: depends_on: [mariadb]`` means shop uses mariadb.  Freeze quiesces shop first (so it stops
writing through mariadb) and mariadb after; thaw resumes mariadb first, then shop.  Each phase is
a DAG: an app waits only for the apps it must follow, and starts as soon as they are done, so
independent chains overlap instead of advancing level by level.  Steps (levels) are kept only to
explain the plan to people.
"""

from __future__ import annotations

from dataclasses import dataclass

from .model import Config


@dataclass(frozen=True)
class PhasePlan:
    name: str  # "freeze" or "thaw"
    order: tuple[str, ...]  # a topological order, stable with respect to the config file
    waits_for: tuple[tuple[str, tuple[str, ...]], ...]  # app -> the apps it must follow
    steps: tuple[tuple[str, ...], ...]  # apps that may run side by side, for display

    def predecessors(self, app: str) -> tuple[str, ...]:
        for name, before in self.waits_for:
            if name == app:
                return before
        raise KeyError(app)


@dataclass(frozen=True)
class Plan:
    freeze: PhasePlan
    thaw: PhasePlan


def _phase(name: str, apps: tuple[str, ...], waits: dict[str, tuple[str, ...]]) -> PhasePlan:
    level: dict[str, int] = {}
    order: list[str] = []
    remaining = list(apps)
    # Kahn's algorithm, scanning in file order each round so ties keep the administrator's order.
    while remaining:
        for app in remaining:
            if all(dep in level for dep in waits[app]):
                level[app] = 1 + max((level[d] for d in waits[app]), default=-1)
                order.append(app)
                remaining.remove(app)
                break
        else:  # config validation rejects cycles; this guards against misuse of the planner
            raise ValueError(f"dependency cycle among {', '.join(remaining)}")
    depth = max(level.values(), default=-1) + 1
    steps = tuple(tuple(a for a in order if level[a] == i) for i in range(depth))
    return PhasePlan(
        name=name,
        order=tuple(a for step in steps for a in step),  # by step, then file order
        waits_for=tuple((app, waits[app]) for app in apps),
        steps=steps,
    )


def build_plan(config: Config) -> Plan:
    apps = config.app_names
    dependents: dict[str, list[str]] = {name: [] for name in apps}
    for app in config.apps:
        for dep in app.depends_on:
            dependents[dep].append(app.name)
    freeze_waits = {name: tuple(dependents[name]) for name in apps}
    thaw_waits = {app.name: app.depends_on for app in config.apps}
    return Plan(freeze=_phase("freeze", apps, freeze_waits), thaw=_phase("thaw", apps, thaw_waits))


def subset(phase: PhasePlan, apps: set[str]) -> PhasePlan:
    """The same phase restricted to ``apps``: used to roll back or thaw only what a cycle touched.

    Waits on apps outside the subset are dropped, but order through them is kept: if a waits for b
    and b for c, and b is absent, a still waits for c.
    """
    full = dict(phase.waits_for)

    def reachable(app: str, seen: set[str]) -> set[str]:
        found: set[str] = set()
        for dep in full[app]:
            if dep in seen:
                continue
            seen.add(dep)
            if dep in apps:
                found.add(dep)
            else:
                found |= reachable(dep, seen)
        return found

    kept = tuple(a for a in phase.order if a in apps)
    waits = {a: tuple(d for d in kept if d in reachable(a, set())) for a in kept}
    return _phase(phase.name, kept, waits)
