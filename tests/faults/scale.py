"""How hard the fault suite pushes: a short form in CI, a long one under `make chaos`."""

import os

LONG = os.environ.get("LOYALTY_FAULT_SCALE", "short") == "long"


def pick(short, long):
    return long if LONG else short
