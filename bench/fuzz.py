"""Fuzz: generated and mutated submissions through the gateway's decode + admit,
in-process, no broker. Prints inputs tried, uncaught exceptions, accepted-but-invalid
jobs (judged by an oracle of the rules written apart from the pydantic models) and
oversized rejections, and the throughput.

    python -m bench.fuzz [-n 100000] [--seed 1] [--show 5]

Uncaught, accepted-but-invalid and oversized must be 0; the exit status says whether
they were. The inputs, the checks and the oracle are tests/support/fuzzing.py's, which
the unit tests run in small rounds.
"""

from __future__ import annotations

import argparse
import sys

from sandfleet.common.settings import Settings
from tests.support.fuzzing import FuzzReport, fuzz_round


def progress(report: FuzzReport) -> None:
    rate = report.tried / report.seconds if report.seconds else 0.0
    print(
        f"  {report.tried:>7} tried, {report.failures} failing, {rate:,.0f}/s",
        file=sys.stderr,
        flush=True,
    )


def summary(report: FuzzReport, show: int) -> str:
    rate = report.tried / report.seconds if report.seconds else 0.0
    lines = [
        f"inputs tried:          {report.tried}",
        f"  accepted:            {report.accepted}",
        f"  undecodable:         {report.undecodable}",
        f"  invalid:             {report.invalid}",
        f"uncaught exceptions:   {len(report.uncaught)}",
        f"accepted but invalid:  {len(report.accepted_invalid)}",
        f"oversized rejections:  {len(report.oversized_rejections)}",
        f"throughput:            {rate:,.0f} inputs/s ({report.seconds:.1f} s)",
    ]
    for title, samples in [
        ("uncaught", report.uncaught),
        ("accepted but invalid", report.accepted_invalid),
        ("oversized rejections", report.oversized_rejections),
    ]:
        lines += [f"--- {title} (first {show}):", *samples[:show]] if samples else []
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", "--inputs", type=int, default=100_000)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--show", type=int, default=5, help="failing inputs to print")
    args = parser.parse_args()
    settings = Settings(host="fuzz")
    report = fuzz_round(args.inputs, seed=args.seed, settings=settings, on_progress=progress)
    print(summary(report, args.show))
    return 1 if report.failures else 0


if __name__ == "__main__":
    sys.exit(main())
