"""Freeze and thaw order from depends_on."""

from __future__ import annotations

from qgafreeze.config import parse_config
from qgafreeze.planner import build_plan, subset


def plan_for(apps: dict):
    return build_plan(
        parse_config({"apps": {n: {"units": [f"{n}.service"], **a} for n, a in apps.items()}})
    )


def test_freeze_runs_users_before_what_they_use_and_thaw_the_reverse():
    plan = plan_for({"mariadb": {}, "shop": {"depends_on": ["mariadb"]}, "cache": {}})
    assert plan.freeze.steps == (("shop", "cache"), ("mariadb",))
    assert plan.thaw.steps == (("mariadb", "cache"), ("shop",))
    assert plan.freeze.predecessors("mariadb") == ("shop",)
    assert plan.thaw.predecessors("shop") == ("mariadb",)


def test_independent_apps_share_a_step_in_file_order():
    plan = plan_for({"b": {}, "a": {}, "c": {}})
    assert plan.freeze.steps == (("b", "a", "c"),)


def test_diamond_dependencies():
    plan = plan_for(
        {
            "db": {},
            "api": {"depends_on": ["db"]},
            "worker": {"depends_on": ["db"]},
            "web": {"depends_on": ["api", "worker"]},
        }
    )
    assert plan.freeze.order == ("web", "api", "worker", "db")
    assert plan.thaw.order == ("db", "api", "worker", "web")


def test_subset_keeps_order_through_apps_left_out():
    # web -> api -> db; rolling back only web and db must still resume db before web.
    plan = plan_for({"db": {}, "api": {"depends_on": ["db"]}, "web": {"depends_on": ["api"]}})
    part = subset(plan.thaw, {"web", "db"})
    assert part.order == ("db", "web")
    assert part.predecessors("web") == ("db",)
