"""The posting kernel logs its events, or returns them for the caller to log last.

A use case that writes after the kernel (a payment's outcome, a refund, a stored response)
held the event log's head, and so every other writer's commit, across that round trip. With
`log` false, post_points logs nothing and returns the events as a last row (result UNLOGGED,
their rows in `unlogged`); the use case logs them with log_events pipelined with its
COMMIT, so the head is again the last lock and held for the commit's round trip only.
"""

import importlib.util
from pathlib import Path
from types import ModuleType

from alembic import op

revision = "0007"
down_revision = "0006"


def _revision_0006() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "kernel_0006", Path(__file__).with_name("0006_posting_kernel.py")
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# 0006's post_points with two changes, written as edits of it so that the kernel's body
# stays written once: the `log` argument and `unlogged` column, and its last step. `log`
# defaults to true: a replica of the release before, still calling post_points with four
# arguments while this one migrates, gets the kernel that logs, as before. (0006's text is
# frozen: tests/ledger/test_kernel.py holds its digest.)
_EDITS = [
    (
        "snapshots boolean, events jsonb)\nRETURNS TABLE",
        "snapshots boolean, events jsonb,\n    log boolean DEFAULT true)\nRETURNS TABLE",
    ),
    (
        "    replay_response jsonb, account jsonb)",
        "    replay_response jsonb, account jsonb, unlogged jsonb)",
    ),
    (
        """    PERFORM log_events(logged);
END""",
        """    IF log THEN
        PERFORM log_events(logged);
        RETURN;
    END IF;
    -- Left to the caller, which logs them as the last statement before its COMMIT.
    posting := NULL;
    result := 'UNLOGGED';
    points_after := NULL;
    replay_fingerprint := NULL;
    replay_response := NULL;
    account := NULL;
    unlogged := logged;
    RETURN NEXT;
END""",
    ),
]


def post_points() -> str:
    """The kernel as of this revision."""
    kernel = _revision_0006().POST_POINTS
    for old, new in _EDITS:
        assert kernel.count(old) == 1, old
        kernel = kernel.replace(old, new)
    return kernel


def upgrade() -> None:
    op.execute("DROP FUNCTION post_points(jsonb, boolean, boolean, jsonb)")
    op.execute(post_points())


def downgrade() -> None:
    op.execute("DROP FUNCTION post_points(jsonb, boolean, boolean, jsonb, boolean)")
    op.execute(_revision_0006().POST_POINTS)
