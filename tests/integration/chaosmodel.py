"""The model that test_chaos.py holds the daemon to: what each request must answer in each
state, as the README ("What a freeze does, exactly"), docs/design.md and engine.py say it."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, replace
from typing import Any

APPS = ("a", "b", "c")
# The two configs' apps in the order status lists them (test_chaos.CONFIGS).
ORDER = {"A": ["a", "b", "c"], "B": ["c", "b", "a"]}
STATES = ("thawed", "freezing", "frozen", "thawing")


@dataclass(frozen=True)
class Model:
    frozen: bool = False
    paused: frozenset[str] = frozenset()
    cycle: str = ""  # of the freeze that froze, when known
    in_force: str = "A"  # the config the daemon uses; a restarted daemon reads `file`
    file: str = "A"
    # False once a kill mid-cycle left apps whose record and units may disagree in the safe
    # direction (recorded as paused, running): a thaw makes the model exact again.
    exact: bool = True


@dataclass
class Answer:
    op: str
    reply: dict[str, Any] | None  # None: no reply (the daemon died mid-request)
    transport: str = ""
    sent: float = 0.0
    received: float = 0.0

    def code(self) -> str | None:
        if self.reply is None:
            return "transport"
        error = self.reply.get("error")
        return error.get("code") if isinstance(error, dict) else None

    def message(self) -> str:
        error = (self.reply or {}).get("error")
        return str(error.get("message")) if isinstance(error, dict) else ""

    def brief(self) -> str:
        """One line for hypothesis's notes."""
        reply = self.reply
        if reply is None:
            return f"{self.op}: {self.transport}"
        if self.code():
            return f"{self.op}: {self.code()} {self.message()[:60]}"
        if self.op not in SERIAL:
            return f"{self.op}: ok {reply.get('state')} paused {reply.get('paused_apps')}"
        apps = [a.get("app") for a in reply.get("apps") or []]
        return f"{self.op}: ok {reply.get('state')} {apps} {reply.get('note', '')}".rstrip()


def freeze_answer(model: Model, answer: Answer) -> Model | None:
    """The model after ``answer`` to a freeze sent in ``model``, or None if it may not answer
    that there."""
    reply = answer.reply or {}
    if model.frozen or model.paused:
        wanted = "already frozen" if model.frozen else "still paused"
        ok = answer.code() == "bad-state" and wanted in answer.message()
        return model if ok else None
    apps = reply.get("apps") or []
    if not (
        reply.get("ok") is True
        and reply.get("state") == "frozen"
        and sorted(a.get("app") for a in apps) == sorted(APPS)
        and all(a.get("result") == "ok" and a.get("phase") == "freeze" for a in apps)
        and not reply.get("rollback")
    ):
        return None
    return replace(model, frozen=True, paused=frozenset(APPS), cycle=str(reply.get("cycle")))


def thaw_answer(model: Model, answer: Answer) -> Model | None:
    reply = answer.reply or {}
    if reply.get("ok") is not True or reply.get("state") != "thawed":
        return None
    apps = reply.get("apps") or []
    if not model.frozen:
        if apps or reply.get("note") != "nothing to thaw: no app is paused":
            return None
        return model
    if model.cycle and reply.get("cycle") != model.cycle:
        return None
    if model.paused:
        resumed = {a.get("app") for a in apps if a.get("result") == "ok"}
        if resumed != model.paused or len(apps) != len(model.paused) or reply.get("note"):
            return None
    elif apps or reply.get("note") != "no app needed resuming":
        return None
    return replace(model, frozen=False, paused=frozenset(), cycle="", exact=True)


SERIAL = {"freeze": freeze_answer, "thaw": thaw_answer}


def linearize(model: Model, answers: list[Answer]) -> list[Model]:
    """Every model a serial order of the cycles in ``answers`` ends in, each cycle answering as
    it did, an answer received before another was sent coming first (busy answers excepted:
    they run no cycle).  Empty: no order explains the answers."""
    cycles = [a for a in answers if a.op in SERIAL and a.code() != "busy"]
    ends = []
    for order in itertools.permutations(cycles):
        if any(
            later.received < earlier.sent
            for i, earlier in enumerate(order)
            for later in order[i + 1 :]
        ):
            continue
        state: Model | None = model
        for answer in order:
            state = SERIAL[answer.op](state, answer) if state else None
        if state is not None and state not in ends:
            ends.append(state)
    return ends


def check_query(answer: Answer, concurrent: bool, before: Model) -> None:
    """Ping and status always answer; with no cycle running beside them, exactly the model."""
    reply = answer.reply or {}
    assert reply.get("ok") is True and reply.get("state") in STATES, reply
    if concurrent:
        return
    assert reply["state"] == ("frozen" if before.frozen else "thawed"), (reply, before)
    if answer.op == "status":
        assert set(reply["paused_apps"]) == before.paused, (reply["paused_apps"], before)
        assert reply["apps"] == ORDER[before.in_force], (reply["apps"], before)
        assert reply["config_error"] is None


def after_signal_mid_cycle(
    before: Model, answer: Answer, sig: str, sent: bool, now: dict[str, Any], down: set[str]
) -> Model:
    """The model after ``sig`` hit the daemon while it served ``answer``'s request in
    ``before``; ``now`` is the status its successor gives, ``down`` the apps systemd has down."""
    op = answer.op
    paused = frozenset(now["paused_apps"])
    assert down <= paused, f"{down} down but not listed as paused"
    assert now["apps"] == ORDER[before.file], (now["apps"], before)
    served = SERIAL[op](before, answer) if answer.reply and answer.code() != "busy" else None
    if answer.reply is not None and answer.code() != "busy":
        assert served is not None, f"{op} answered {answer.reply} in {before}"
    if answer.code() == "busy":
        assert sig == "TERM" and "shutting down" in answer.message(), answer.reply
    frozen = now["state"] == "frozen"
    assert now["state"] in ("frozen", "thawed"), now
    if not frozen:
        assert not paused, now
    if sig == "TERM" and sent:
        # The old daemon resumed everything before it exited; a freeze it had not taken
        # may have been served by its successor, which then holds that cycle.
        if frozen:
            assert served is not None and served.frozen and now["cycle"] == served.cycle, (
                "SIGTERM left the daemon frozen",
                now,
                answer.reply,
            )
    elif served is not None:
        # The cycle finished before the kill: its outcome stands.
        assert (frozen, paused) == (served.frozen, served.paused), (now, served)
    elif before.frozen and op == "freeze":
        assert frozen and paused == before.paused, (now, before)
    elif not before.frozen and op == "thaw":
        assert not frozen, now
    elif before.frozen:  # a thaw killed half-way: what it had not resumed stays paused
        assert paused <= before.paused, (now, before)
    # else: a freeze killed half-way is frozen with what it had recorded, or not at all.
    return Model(
        frozen=frozen,
        paused=paused,
        cycle=str(now["cycle"]) if frozen else "",
        in_force=before.file,
        file=before.file,
        exact=down == paused,
    )
