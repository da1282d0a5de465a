"""The figures of the database write-stall bench (bench/stallstats.py): the longest gap between
acknowledged writes, the median (min-max) cells, and reading the Redis section's table back."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

from stallstats import (
    longest_gap,
    parse_spread,
    replace_section,
    spread,
    table_rows,
)


def test_the_longest_gap_is_the_widest_space_between_acknowledged_writes():
    assert longest_gap([10.1, 10.2, 12.7, 12.8, 13.5], start=10.0, end=13.0) == pytest.approx(2.5)


def test_the_gap_from_the_freeze_request_to_the_first_write_counts():
    assert longest_gap([13.0, 13.1], start=10.0, end=12.0) == pytest.approx(3.0)


def test_writes_before_the_freeze_request_do_not_count():
    assert longest_gap([1.0, 9.9, 10.2, 10.3], start=10.0, end=10.25) == pytest.approx(0.2)


def test_the_count_stops_at_the_first_write_after_the_thaw():
    # The writer's own pause long after the thaw is not the backup's.
    assert longest_gap([10.1, 11.0, 20.0], start=10.0, end=10.5) == pytest.approx(0.9)


def test_writes_that_never_resumed_give_the_gap_up_to_the_thaw_as_a_lower_bound():
    assert longest_gap([10.1], start=10.0, end=14.0) == pytest.approx(3.9)
    assert longest_gap([], start=10.0, end=14.0) == pytest.approx(4.0)


def test_a_figure_is_written_as_median_then_min_max():
    assert spread([3.0, 1.0, 2.0]) == "2 (1-3)"
    assert spread([2.04, 2.51, 2.15], 2) == "2.15 (2.04-2.51)"
    assert spread([1.5], 1) == "1.5"
    assert spread([]) == "-"


def test_a_cell_reads_back_as_median_min_max():
    assert parse_spread("2.15 (2.04-2.51)") == (2.15, 2.04, 2.51)
    assert parse_spread("7") == (7.0, 7.0, 7.0)
    assert parse_spread("yes") is None


def test_the_rows_of_a_marked_section_are_its_tables_body():
    text = "\n".join(
        [
            "| other | table |",
            "| --- | --- |",
            "| not | this |",
            "<!-- b -->",
            "intro",
            "| approach | freeze |",
            "| --- | --- |",
            "| preset | 1200 (1100-1300) |",
            "| SAVE | 900 (800-950) |",
            "",
            "| second | table |",
            "| --- | --- |",
            "| left | out |",
            "<!-- e -->",
        ]
    )
    assert table_rows(text, "<!-- b -->", "<!-- e -->") == [
        ["preset", "1200 (1100-1300)"],
        ["SAVE", "900 (800-950)"],
    ]
    assert table_rows("no markers", "<!-- b -->", "<!-- e -->") == []


def test_a_section_is_replaced_between_its_markers_or_appended():
    text = "head\n<!-- b -->\nold\n<!-- e -->\ntail\n"
    assert replace_section(text, "<!-- b -->", "<!-- e -->", "<!-- b -->\nnew\n<!-- e -->") == (
        "head\n<!-- b -->\nnew\n<!-- e -->\ntail\n"
    )
    assert replace_section("head\n", "<!-- b -->", "<!-- e -->", "S") == "head\n\nS\n"
