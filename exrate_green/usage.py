"""Usage errors in one line: what is wrong with the command line, and a pointer to --help.

docopt only says that the arguments do not match (with its own internal reprs, then the
whole usage); ``usage_problem`` reads the arguments again to say which one is wrong.
"""

from __future__ import annotations

import re

#: the actions of ``cache``
CACHE_ACTIONS = ("list", "show", "stats", "clear", "warm")
HELP_POINTER = "see 'exrate-service --help'"

#: options every command takes
_COMMON = {"--log-level", "-h", "--help", "--version"}
#: the options each command uses (None: the service itself); any other is refused, so an
#: option that would be silently ignored (``demo --url``: the demo is sealed) is an error
COMMAND_OPTIONS: dict[str | None, set[str]] = {
    None: {"--show-messages", "--url", "--provider", "--cache-dir"},
    "demo": {"--duration", "--rate", "--show-messages", "--provider"},
    "cache": {"--json", "--provider", "--cache-dir", "--tier", "--yes"},
    "convert": {"--json", "--provider", "--cache-dir"},
    "simulate": {"--host", "--port", "--rate", "--poisson", "--duration", "--faults",
                 "--report", "--requests", "--dates", "--seed", "--drain", "--rate-api",
                 "--rate-api-latency", "--rate-api-fail"},
}
#: options of one cache action only
_CACHE_ACTION_OPTIONS = {"--tier": "clear", "--yes": "clear"}


def usage_problem(doc: str, argv: list[str], docopt_message: str = "") -> str:
    """One line saying what is wrong with ``argv`` for the usage in ``doc``."""
    positionals, given, problem = _scan(doc, argv)
    return (problem or _positional_problem(positionals, _commands(doc))
            or _refused(positionals, given) or _docopt_problem(docopt_message))


def refused_option(doc: str, argv: list[str]) -> str | None:
    """One line naming an option ``argv`` gives to a command that does not use it, else
    None. docopt's ``[options]`` lets every command take every option; this is stricter."""
    positionals, given, _ = _scan(doc, argv)
    return _refused(positionals, given)


def _scan(doc: str, argv: list[str]) -> tuple[list[str], list[str], str]:
    """(positional words, options given by their full names, the first problem or "")
    of ``argv`` read against the options ``doc`` declares."""
    flags, valued = _options(doc)
    positionals: list[str] = []
    given: list[str] = []
    problem = ""
    args = iter(argv)
    for arg in args:
        if arg == "--":
            positionals.extend(args)
            break
        if arg.startswith("-") and arg != "-":
            name = arg.split("=", 1)[0]
            known = _expand(name, flags | valued)
            if known is None:
                problem = problem or f"unknown option {name!r}"
                continue
            given.append(known)
            if known in valued and "=" not in arg and next(args, None) is None:
                problem = problem or f"{known} needs a value"
            continue
        positionals.append(arg)
    return positionals, given, problem


def _refused(positionals: list[str], given: list[str]) -> str | None:
    command = positionals[0] if positionals else None
    allowed = COMMAND_OPTIONS.get(command)
    if allowed is None:
        return None  # an unknown command: said elsewhere
    where = f"'{command}'" if command else "the service itself (no command)"
    for option in given:
        if option not in allowed | _COMMON:
            why = " (the demo is sealed: it uses its own simulator and cache)" \
                if command == "demo" and option in ("--url", "--cache-dir") else ""
            return f"{option} is not an option of {where}{why}"
        action = _CACHE_ACTION_OPTIONS.get(option)
        if command == "cache" and action and positionals[1:2] != [action]:
            return f"{option} is an option of 'cache {action}' only"
    return None


def _usage_lines(doc: str) -> list[str]:
    """The usage patterns of ``doc``, without the program name (continuations joined)."""
    usage = doc.split("Usage:", 1)[-1].split("\n\n", 1)[0]
    patterns: list[str] = []
    for line in usage.strip().splitlines():
        words = line.split()
        if words and words[0] == "exrate-service":
            patterns.append(" ".join(words[1:]))
        elif patterns:
            patterns[-1] += " " + " ".join(words)
    return patterns


def _commands(doc: str) -> list[str]:
    """The commands of ``doc``'s usage (``demo``, ``cache``, ...), in order."""
    commands = [line.split()[0] for line in _usage_lines(doc)
                if line and line.split()[0].isalpha()]
    return list(dict.fromkeys(commands))  # cache has a line per action


def _positional_problem(positionals: list[str], commands: list[str]) -> str | None:
    if not positionals:
        return None
    command, rest = positionals[0], positionals[1:]
    if command not in commands:
        return f"unknown command {command!r}: choose one of {', '.join(commands)}"
    if command == "cache":
        return _cache_problem(rest)
    if command == "convert":
        if len(rest) < 2:
            return ("convert needs AMOUNT and CURRENCY, and takes an optional DATE "
                    "(e.g. convert 253.67 USD 2021-05-18)")
        if len(rest) > 3:
            return f"convert takes AMOUNT CURRENCY [DATE]; unexpected {rest[3]!r}"
        return None
    if rest:
        return f"{command} takes no argument {rest[0]!r}"
    return None


def _cache_problem(rest: list[str]) -> str | None:
    actions = "list, show DAY, stats, clear or warm START END"
    if not rest:
        return f"cache needs an action: {actions}"
    action, extra = rest[0], rest[1:]
    if action not in CACHE_ACTIONS:
        return f"unknown cache action {action!r}: choose {actions}"
    if action == "show" and not extra:
        return "cache show needs a DAY (YYYY-MM-DD)"
    if action == "warm" and len(extra) < 2:
        return "cache warm needs START and END (YYYY-MM-DD), e.g. cache warm 2024-01-01 2024-03-31"
    allowed = {"show": 1, "warm": 2}.get(action, 0)
    if len(extra) > allowed:
        return f"cache {action}: unexpected {extra[allowed]!r}"
    return None


def _docopt_problem(message: str) -> str:
    """docopt's own first line when it is meaningful (``--url requires argument``)."""
    first = message.strip().splitlines()[0] if message.strip() else ""
    if first and not first.startswith(("Warning:", "Usage:")):
        return first
    return "these options do not go with this command"


def _options(doc: str) -> tuple[set[str], set[str]]:
    """The option names of ``doc``'s Options section: (flags, options taking a value)."""
    section = doc.split("Options:", 1)[-1]
    flags: set[str] = set()
    valued: set[str] = set()
    for line in section.splitlines():
        line = line.strip()
        if not line.startswith("-"):
            continue  # a description's continuation
        for name, value in re.findall(r"(--?[A-Za-z][\w-]*)(=\S+)?", line.split("  ")[0]):
            (valued if value else flags).add(name)
    return flags, valued


def _expand(name: str, known: set[str]) -> str | None:
    """``name`` as docopt reads it: exact, or an unambiguous prefix of a long option."""
    if name in known:
        return name
    if name.startswith("--"):
        matches = [k for k in known if k.startswith(name)]
        if len(matches) == 1:
            return matches[0]
    return None
