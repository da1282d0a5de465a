"""Shell text read as ``sh`` splits it, as far as the trust check needs: the words of each simple
command, with quotes removed and redirections, comments and here-documents left out, and the
commands substituted inside a word.

Not a shell: it does no expansion, and the caller refuses what it cannot follow (a command word
with ``$``, a relative path).  Where it errs, it errs towards reading more words as commands.
"""

from __future__ import annotations

import re

_OPERATORS = ";&|()<>\n"
_DOUBLE_QUOTED = re.compile(r'"((?:[^"\\]|\\.)*)"', re.S)
# <<WORD, <<-WORD, <<'WORD', <<\WORD; not bash's <<< here-string.
_HEREDOC = re.compile(r"(?<!<)<<(?!<)(-?)[ \t]*(?:\\|['\"])?([\w.-]+)")


def _tokens(text: str) -> list[tuple[bool, str]]:
    """Shell text as (is an operator, text): quotes removed, comments and here-documents dropped.
    Raises ValueError for a quote left open."""
    lines: list[str] = []
    ends: list[tuple[bool, str]] = []  # here-document bodies are data: dropped up to their end word
    for line in text.split("\n"):
        if ends and (line.lstrip("\t") if ends[0][0] else line) == ends[0][1]:
            ends.pop(0)
        elif not ends:
            lines.append(line)
            ends.extend((bool(m.group(1)), m.group(2)) for m in _HEREDOC.finditer(line))
    text = "\n".join(lines)
    tokens: list[tuple[bool, str]] = []
    word: list[str] | None = None  # None between words
    i, n = 0, len(text)
    while i < n:
        ch = text[i]
        if ch == "\\":
            if text[i + 1 : i + 2] not in ("", "\n"):  # a backslash-newline joins two lines
                word = (word or []) + [text[i + 1]]
            i += 2
        elif ch == "'":
            end = text.find("'", i + 1)
            if end < 0:
                raise ValueError("a quote is not closed")
            word = (word or []) + [text[i + 1 : end]]
            i = end + 1
        elif ch == '"':
            quoted = _DOUBLE_QUOTED.match(text, i)
            if quoted is None:
                raise ValueError("a quote is not closed")
            word = (word or []) + [re.sub(r'\\([\\"$`\n])', r"\1", quoted.group(1))]
            i = quoted.end()
        elif ch in " \t\r" or ch in _OPERATORS or (ch == "#" and word is None):
            if word is not None:
                tokens.append((False, "".join(word)))
                word = None
            end = i + 1
            if ch == "#":
                end = n if text.find("\n", i) < 0 else text.find("\n", i)
            elif ch in _OPERATORS:
                while ch != "\n" and end < n and text[end] in _OPERATORS[:-1]:
                    end += 1
                tokens.append((True, text[i:end]))
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
    """The text of each ``$(...)`` and backquoted command inside a word (a quoted one too)."""
    found = re.findall(r"`([^`]*)`", word)
    start = word.find("$(")
    while start >= 0:
        depth, end = 1, start + 2
        while end < len(word) and depth:
            depth += {"(": 1, ")": -1}.get(word[end], 0)
            end += 1
        found.append(word[start + 2 : end if depth else end - 1])
        start = word.find("$(", end)
    return found
