"""How a warm container waits for its job: a shell script as its main process, reading
the job's argv and environment from stdin, then exec'ing the job's command.

Shared by the container drivers; it is not a driver itself.

The driver writes one line per value, then `go`:

    e <enc>   one NAME=VALUE to export (all of them before any `a`)
    a <enc>   one argv element, in order
    go        exec the argv, stdin from /dev/null

`<enc>` holds only `[A-Za-z0-9]` and `\\0ooo` octal escapes for every other byte, so no
newline, quote, `$` or backtick ever reaches the shell as syntax; the shim decodes a
value with printf's `%b` and nothing is ever eval'ed. It uses shell builtins only
(images may lack every tool but /bin/sh).

When stdin ends before `go` (the worker holding it is gone, so Docker and Podman close
a StdinOnce container's stdin) the shim exits ORPHANED_EXIT_CODE without running
anything.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

ORPHANED_EXIT_CODE = 75  # EX_TEMPFAIL: no job ran; the sandbox is only to be removed
PROTOCOL_EXIT_CODE = 76  # a line the shim does not know: a driver bug, no job ran
SHIM_NAME = "sandfleet-warm"  # the script's $0, in `ps` and in its messages

# "$@" is built as: the environment (prepended, so its order reverses: names are
# unique), a `--`, then the argv (appended). No NAME=VALUE is ever `--`, so the final
# loop finds the boundary with no variable of its own: after the first export no
# shell variable is assigned again, so a job's variable named like one of the shim's
# keeps the job's value. `v=${v%x}`: the `x` printed last keeps trailing newlines,
# which command substitution would strip.
SHIM = f"""set -- --
while IFS=' ' read -r _sandfleet_kind _sandfleet_enc; do
  case $_sandfleet_kind in
    a) _sandfleet_v=$(printf '%bx' "$_sandfleet_enc"); set -- "$@" "${{_sandfleet_v%x}}" ;;
    e) _sandfleet_v=$(printf '%bx' "$_sandfleet_enc"); set -- "${{_sandfleet_v%x}}" "$@" ;;
    go)
      while [ "$1" != -- ]; do export "$1"; shift; done
      shift
      exec "$@" </dev/null ;;
    *) printf '%s: unknown line from the worker; no job ran\\n' "$0" >&2
       exit {PROTOCOL_EXIT_CODE} ;;
  esac
done
printf '%s: the worker that made this sandbox is gone (stdin closed); no job ran\\n' "$0" >&2
exit {ORPHANED_EXIT_CODE}
"""

SHIM_ENTRYPOINT = ("/bin/sh", "-c", SHIM, SHIM_NAME)

_PLAIN = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789")


def encode(value: str) -> str:
    """`value`'s UTF-8 bytes, letters and digits as they are, every other byte `\\0ooo`
    (three octal digits, so a digit after an escape is never read as part of it)."""
    return "".join(
        chr(byte) if byte in _PLAIN else f"\\0{byte:03o}" for byte in value.encode("utf-8")
    )


def job_lines(argv: Sequence[str], environment: Mapping[str, str]) -> bytes:
    """What the driver writes to a waiting shim's stdin to start this job."""
    lines = [f"e {encode(f'{name}={value}')}" for name, value in environment.items()]
    lines += [f"a {encode(element)}" for element in argv]
    lines.append("go")
    return ("\n".join(lines) + "\n").encode("ascii")


def job_argv(
    command: Sequence[str], image_entrypoint: Sequence[str], image_cmd: Sequence[str]
) -> list[str]:
    """What a cold container of this image would run: its entrypoint, then the job's
    command, or the image's Cmd when the job names none."""
    return [*image_entrypoint, *(command or image_cmd)]
