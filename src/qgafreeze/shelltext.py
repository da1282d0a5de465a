"""Shell text read as ``sh`` splits it, as far as the trust check needs: the words of each simple
command, with quotes removed and redirections, comments and here-document bodies left out, and the
commands substituted inside a word.

Not a shell: it does no expansion, and the caller refuses what it cannot follow (a command word
with ``$``, a relative path).  Where it errs, it errs towards reading more words as commands.
"""

from __future__ import annotations

import re

_OPERATORS = ";&|()<>\n"
_DOUBLE_QUOTED = re.compile(r'"((?:[^"\\]|\\.)*)"', re.S)


def _arithmetic_end(text: str, start: int) -> int | None:
    """Where ``$((`` at ``start`` ends, past its ``))``; None when its first ``(`` closes alone,
    which makes it (as bash reads it) a command substitution of a subshell."""
    depth = 2
    for index in range(start + 3, len(text)):
        depth += {"(": 1, ")": -1}.get(text[index], 0)
        if depth == 1:
            return index + 2 if text[index + 1 : index + 2] == ")" else None
    return None


def _bodies(text: str, start: int, pending: list[tuple[bool, str, bool]]) -> tuple[int, list[str]]:
    """Skip the bodies of the here-documents opened on the line that ended just before ``start``;
    where the next line starts, and the bodies a shell expands (their end word was not quoted).
    Raises ValueError for a body whose end word never comes: the lines after it would be hidden."""
    expanded = []
    for strip, end_word, quoted in pending:
        body: list[str] = []
        closed = False
        while start < len(text) and not closed:
            stop = text.find("\n", start) % (len(text) + 1)  # -1: the text ends the line
            line = text[start:stop]
            closed = (line.lstrip("\t") if strip else line) == end_word
            body += [] if closed else [line]
            start = stop + 1
        if body and not closed:
            raise ValueError("a here-document is not closed")
        if not quoted:
            expanded.append("\n".join(body))
    return start, expanded


def _tokens(text: str) -> list[tuple[bool, str]]:
    """Shell text as (is an operator, text): quotes removed, comments dropped, and each
    here-document's body dropped, or given as the words of ``:`` when the shell expands it.
    Raises ValueError for a quote or a here-document left open."""
    tokens: list[tuple[bool, str]] = []
    word: list[str] | None = None  # None between words
    quoted = False  # the word being read has a quote or backslash in it
    heredoc: bool | None = None  # the next word ends a here-document: whether <<- strips tabs
    pending: list[tuple[bool, str, bool]] = []  # here-documents whose bodies start next line
    i, n = 0, len(text)
    while i < n:
        ch = text[i]
        arithmetic = _arithmetic_end(text, i) if text.startswith("$((", i) else None
        if arithmetic is not None:
            word = (word or []) + [text[i:arithmetic]]
            i = arithmetic
        elif ch == "\\":
            if text[i + 1 : i + 2] not in ("", "\n"):  # a backslash-newline joins two lines
                word, quoted = (word or []) + [text[i + 1]], True
            i += 2
        elif ch == "'":
            end = text.find("'", i + 1)
            if end < 0:
                raise ValueError("a quote is not closed")
            word, quoted = (word or []) + [text[i + 1 : end]], True
            i = end + 1
        elif ch == '"':
            match = _DOUBLE_QUOTED.match(text, i)
            if match is None:
                raise ValueError("a quote is not closed")
            word = (word or []) + [re.sub(r'\\([\\"$`\n])', r"\1", match.group(1))]
            quoted, i = True, match.end()
        elif ch in " \t\r" or ch in _OPERATORS or (ch == "#" and word is None):
            if word is not None:
                tokens.append((False, "".join(word)))
                if heredoc is not None:
                    pending.append((heredoc, tokens[-1][1], quoted))
                word, quoted, heredoc = None, False, None
            end = i + 1
            if ch == "#":
                end = n if text.find("\n", i) < 0 else text.find("\n", i)
            elif ch in _OPERATORS:
                while ch != "\n" and end < n and text[end] in _OPERATORS[:-1]:
                    end += 1
                if text[i:end].endswith("<<") and not text[i:end].endswith("<<<"):
                    heredoc = text[end : end + 1] == "-"
                    end += 1 if heredoc else 0
                tokens.append((True, text[i:end]))
                if ch == "\n" and pending:
                    end, bodies = _bodies(text, end, pending)
                    pending = []
                    for body in bodies:  # expanded: a `$(...)` in it runs
                        tokens += [(False, ":"), (False, body), (True, "\n")]
            i = end
        else:
            word = (word or []) + [ch]
            i += 1
    return tokens + ([(False, "".join(word))] if word is not None else [])


def simple_commands(text: str) -> list[list[str]]:
    """The words of each simple command of shell text, without redirections and their targets."""
    commands: list[list[str]] = [[]]
    target = False
    depth = 0  # of parentheses: a ")" that closes none ends a case pattern, which runs nothing
    for operator, token in _tokens(text):
        for ch in token if operator else "":
            if ch == "(":
                depth += 1
            elif ch == ")" and depth:
                depth -= 1
            elif ch == ")":
                commands[-1] = []
        if operator and not token.endswith("(") and ("<" in token or ">" in token):
            target = True
        elif operator:
            commands.append([])
            target = False
        elif target:
            target = False  # a redirection's file, not a word of the command
        else:
            commands[-1].append(token)
    return [words for words in commands if words]


def substitutions(word: str) -> list[str]:
    """The text of each ``$(...)`` and backquoted command inside a word (a quoted one too), not
    of an arithmetic ``$((...))`` but of the commands substituted inside it."""
    found = re.findall(r"`([^`]*)`", word)
    start = word.find("$(")
    while start >= 0:
        if word.startswith("$((", start) and _arithmetic_end(word, start) is not None:
            start = word.find("$(", start + 3)  # runs nothing itself, but what it substitutes
            continue
        depth, end = 1, start + 2
        while end < len(word) and depth:
            depth += {"(": 1, ")": -1}.get(word[end], 0)
            end += 1
        found.append(word[start + 2 : end if depth else end - 1])
        start = word.find("$(", end)
    return found
