"""cke raises its open-files soft limit to the hard one at start (one fd per node)."""

from __future__ import annotations

import resource
import subprocess
import sys


def test_soft_limit_is_raised_to_the_hard_one() -> None:
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]

    def low_soft_limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))

    out = subprocess.run(
        [
            sys.executable,
            "-c",
            "import resource; from cke.cli.cke_main import raise_fd_limit; "
            "before = resource.getrlimit(resource.RLIMIT_NOFILE)[0]; "
            "print(before, *raise_fd_limit())",
        ],
        preexec_fn=low_soft_limit,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    assert [int(x) for x in out] == [256, hard, hard]
