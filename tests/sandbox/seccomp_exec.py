#!/usr/bin/python3
"""Runs a command under the system-call filter of a systemd unit, built the way systemd
builds it, for machines where systemd is not PID 1 (containers, CI).

The unit's SystemCallFilter= lines are read in order: the first without `~` is the
allow-list, each `~` line takes calls out of it; groups (@system-service, ...) are
expanded with the local `systemd-analyze syscall-filter`, recursively. Calls outside the
list fail with SystemCallErrorNumber= (EPERM) or, when the unit sets none, kill the
process (SIGSYS), as systemd does. SystemCallArchitectures=native: calls of other
architectures are killed (libseccomp's default for foreign architectures). Loading the
filter sets no_new_privs (NoNewPrivileges=yes).

  seccomp_exec.py UNIT --print            the allowed calls, one per line
  seccomp_exec.py UNIT -- COMMAND ARGS    runs COMMAND under the filter

Needs python3-seccomp (Debian) and systemd-analyze.
"""
import errno
import os
import subprocess
import sys

import seccomp


def expand(name, seen):
    if not name.startswith("@"):
        return {name}
    if name in seen:
        return set()
    seen.add(name)
    out = subprocess.run(
        ["systemd-analyze", "syscall-filter", name],
        capture_output=True, text=True, check=True,
    ).stdout
    calls = set()
    for line in out.splitlines()[1:]:
        token = line.strip()
        if token and not token.startswith("#"):
            calls |= expand(token, seen)
    return calls


def unit_filter(unit):
    allowed, action = None, None
    for raw in open(unit, encoding="utf-8"):
        line = raw.strip()
        if line.startswith("SystemCallErrorNumber="):
            action = line.split("=", 1)[1]
        if not line.startswith("SystemCallFilter="):
            continue
        value = line.split("=", 1)[1]
        deny = value.startswith("~")
        names = set()
        for item in value.lstrip("~").split():
            names |= expand(item, set())
        if deny:
            if allowed is None:
                sys.exit(f"{unit}: a deny-list first is not modelled here")
            allowed -= names
        elif allowed is None:
            allowed = names
        else:
            allowed |= names
    if allowed is None:
        sys.exit(f"{unit} has no SystemCallFilter=")
    return allowed, action


def main():
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    allowed, action = unit_filter(sys.argv[1])
    if sys.argv[2] == "--print":
        print("\n".join(sorted(allowed)))
        return
    if sys.argv[2] != "--" or len(sys.argv) < 4:
        sys.exit(__doc__)
    if action is None:
        default = seccomp.KILL_PROCESS
    else:
        default = seccomp.ERRNO(getattr(errno, action))
    f = seccomp.SyscallFilter(defaction=default)
    for name in sorted(allowed):
        try:
            f.add_rule(seccomp.ALLOW, name)
        except (RuntimeError, ValueError):
            pass  # a call this architecture does not have
    f.load()
    os.execvp(sys.argv[3], sys.argv[3:])


main()
