"""Run a command under the seccomp filters a systemd unit file asks for, as systemd 252 (Debian 12)
builds them, where no systemd can run the unit (PID 1 here is not systemd):

    python tests/systemd_sandbox.py deploy/livecounter.service -- COMMAND...

It reads SystemCallFilter= (groups expanded by `systemd-analyze syscall-filter`; an allow list, then
~ lists taken out of it), SystemCallErrorNumber=, SystemCallArchitectures=native,
MemoryDenyWriteExecute= and RestrictAddressFamilies= (allow lists only), and UMask=; loads the
filters with libseccomp (libseccomp2, which systemd depends on) and execs COMMAND. Like systemd it
loads one filter per setting (the kernel applies the strictest answer of all), and a system call a
filter refuses fails with SystemCallErrorNumber= (without it, the process is killed, as systemd does).
Namespaces, mounts, users and the IP address lists are not emulated.
"""

import ctypes
import errno
import os
import re
import socket
import subprocess
import sys

ALLOW, KILL_PROCESS = 0x7FFF0000, 0x80000000
CMP_LT, CMP_EQ, CMP_GT, CMP_MASKED_EQ = 2, 4, 6, 7  # enum scmp_compare
PROT_WRITE, PROT_EXEC, SHM_EXEC = 0x2, 0x4, 0o100000


class ArgCompare(ctypes.Structure):  # struct scmp_arg_cmp
    _fields_ = [("arg", ctypes.c_uint), ("op", ctypes.c_int), ("datum_a", ctypes.c_uint64),
                ("datum_b", ctypes.c_uint64)]


libseccomp = ctypes.CDLL("libseccomp.so.2", use_errno=True)
libseccomp.seccomp_init.restype = ctypes.c_void_p
libseccomp.seccomp_init.argtypes = [ctypes.c_uint32]
libseccomp.seccomp_syscall_resolve_name.argtypes = [ctypes.c_char_p]
libseccomp.seccomp_rule_add_array.argtypes = [ctypes.c_void_p, ctypes.c_uint32, ctypes.c_int, ctypes.c_uint,
                                              ctypes.POINTER(ArgCompare)]
libseccomp.seccomp_load.argtypes = [ctypes.c_void_p]


def errno_action(number: int) -> int:
    return 0x00050000 | number  # SCMP_ACT_ERRNO


def settings_of(unit_file: str) -> dict[str, list[str]]:
    """Every Key=value of the unit, each key's values in order (continuation lines joined)."""
    with open(unit_file) as file:
        text = re.sub(r"\\\n", " ", file.read())
    settings: dict[str, list[str]] = {}
    for line in text.splitlines():
        if "=" in line and not line.lstrip().startswith(("#", ";", "[")):
            key, value = line.split("=", 1)
            settings.setdefault(key.strip(), []).append(value.strip())
    return settings


def expand(names: list[str]) -> set[str]:
    """System call names, with @groups expanded as systemd-analyze lists them."""
    calls = set()
    for name in names:
        if name.startswith("@"):
            listing = subprocess.run(["systemd-analyze", "syscall-filter", name], capture_output=True, text=True,
                                     check=True).stdout.splitlines()[1:]  # after the group's own name
            entries = [line.strip() for line in listing]
            calls |= expand([entry for entry in entries if entry and not entry.startswith("#")])
        else:
            calls.add(name.split(":")[0])  # name:errno: the errno part is not emulated
    return calls


def allowed_calls(filters: list[str]) -> set[str]:
    allowed: set[str] = set()
    for value in filters:
        if value.startswith("~"):
            allowed -= expand(value[1:].split())
        else:
            allowed |= expand(value.split())
    return allowed


def add_rule(context: int, action: int, call: str, *comparisons: tuple[int, int, int, int]) -> None:
    number = libseccomp.seccomp_syscall_resolve_name(call.encode())
    if number < 0:
        return  # not a system call of this architecture (systemd's groups name every architecture's)
    array = (ArgCompare * max(1, len(comparisons)))(*(ArgCompare(*comparison) for comparison in comparisons))
    if libseccomp.seccomp_rule_add_array(context, action, number, len(comparisons), array) != 0:
        sys.exit(f"systemd_sandbox: cannot add a rule for {call}")


def load(context: int) -> None:
    if libseccomp.seccomp_load(context) != 0:
        sys.exit("systemd_sandbox: seccomp_load failed")


def main() -> None:
    unit_file, separator, *command = sys.argv[1:]
    assert separator == "--", "usage: systemd_sandbox.py UNIT -- COMMAND..."
    settings = settings_of(unit_file)
    error_number = settings.get("SystemCallErrorNumber", [""])[-1]
    refused = errno_action(getattr(errno, error_number)) if error_number else KILL_PROCESS
    assert settings.get("SystemCallArchitectures") in (None, ["native"])  # libseccomp's default: native only
    if "UMask" in settings:
        os.umask(int(settings["UMask"][-1], 8))
    if settings.get("MemoryDenyWriteExecute", ["no"])[-1] in ("yes", "true", "on", "1"):
        context = libseccomp.seccomp_init(ALLOW)
        eperm = errno_action(errno.EPERM)  # as systemd 252: seccomp_memory_deny_write_execute()
        add_rule(context, eperm, "mmap", (2, CMP_MASKED_EQ, PROT_WRITE | PROT_EXEC, PROT_WRITE | PROT_EXEC))
        add_rule(context, eperm, "mprotect", (2, CMP_MASKED_EQ, PROT_EXEC, PROT_EXEC))
        add_rule(context, eperm, "pkey_mprotect", (2, CMP_MASKED_EQ, PROT_EXEC, PROT_EXEC))
        add_rule(context, eperm, "shmat", (2, CMP_MASKED_EQ, SHM_EXEC, SHM_EXEC))
        load(context)
    if families := settings.get("RestrictAddressFamilies"):
        assert not families[-1].startswith("~"), "only an allow list is emulated"
        allowed = sorted(getattr(socket, name) for name in families[-1].split())
        context = libseccomp.seccomp_init(ALLOW)
        refuse = errno_action(errno.EAFNOSUPPORT)  # as systemd: below the first, above the last, between
        add_rule(context, refuse, "socket", (0, CMP_LT, allowed[0], 0))
        add_rule(context, refuse, "socket", (0, CMP_GT, allowed[-1], 0))
        for family in set(range(allowed[0], allowed[-1])) - set(allowed):
            add_rule(context, refuse, "socket", (0, CMP_EQ, family, 0))
        load(context)
    # Last: the allow list refuses seccomp() itself, so no filter could be loaded after it.
    if filters := settings.get("SystemCallFilter"):
        assert not filters[0].startswith("~"), "only an allow list is emulated"
        context = libseccomp.seccomp_init(refused)
        for call in sorted(allowed_calls(filters)):
            add_rule(context, ALLOW, call)
        load(context)
    os.execvp(command[0], command)


if __name__ == "__main__":
    main()
