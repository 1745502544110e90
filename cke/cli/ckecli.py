"""Entry point; implemented by its own issue."""

import sys


def main() -> int:
    print("cke ckecli: not implemented yet", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
