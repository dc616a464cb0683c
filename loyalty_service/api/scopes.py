"""The one table of which scope each RPC needs (tests/api/test_auth.py: every RPC of the
protos is in it)."""

from __future__ import annotations

from ..domain.callers import Scope

_ACCOUNTS = "vinr.loyalty.v1.LoyaltyAccounts"
_POINTS = "vinr.loyalty.v1.PointsLedger"
_PROGRAMS = "vinr.loyalty.v1.LoyaltyPrograms"
_EVENTS = "vinr.loyalty.v1.LoyaltyEvents"

# By full method name, as gRPC names it: /package.Service/Method.
SCOPES: dict[str, Scope] = {
    f"/{_ACCOUNTS}/CreateAccount": Scope.ACCOUNTS_WRITE,
    f"/{_ACCOUNTS}/GetAccount": Scope.ACCOUNTS_READ,
    f"/{_ACCOUNTS}/UpdateAccount": Scope.ACCOUNTS_WRITE,
    f"/{_ACCOUNTS}/ListAccounts": Scope.ACCOUNTS_READ,
    f"/{_ACCOUNTS}/CloseAccount": Scope.ACCOUNTS_WRITE,
    f"/{_ACCOUNTS}/ReopenAccount": Scope.ACCOUNTS_WRITE,
    f"/{_ACCOUNTS}/MergeAccounts": Scope.ACCOUNTS_WRITE,
    f"/{_ACCOUNTS}/SubscribeAccountEvents": Scope.EVENTS_READ,
    # ADJUST and EXPIRE need points.adjust as well (PointsLedger.CreatePointsTransaction).
    f"/{_POINTS}/CreatePointsTransaction": Scope.POINTS_WRITE,
    f"/{_POINTS}/GetPointsTransaction": Scope.POINTS_READ,
    f"/{_POINTS}/ListPointsTransactions": Scope.POINTS_READ,
    f"/{_POINTS}/ReversePointsTransaction": Scope.POINTS_ADJUST,
    f"/{_POINTS}/RecordPayment": Scope.PAYMENTS_WRITE,
    f"/{_POINTS}/RecordRefund": Scope.PAYMENTS_WRITE,
    f"/{_POINTS}/SubscribeTransactionEvents": Scope.EVENTS_READ,
    # Holds are checkout's redemptions: what REDEEM needs.
    f"/{_POINTS}/CreateHold": Scope.POINTS_WRITE,
    f"/{_POINTS}/CaptureHold": Scope.POINTS_WRITE,
    f"/{_POINTS}/ReleaseHold": Scope.POINTS_WRITE,
    f"/{_POINTS}/GetHold": Scope.POINTS_READ,
    f"/{_POINTS}/ListHolds": Scope.POINTS_READ,
    f"/{_POINTS}/SubscribeHoldEvents": Scope.EVENTS_READ,
    f"/{_PROGRAMS}/CreateProgram": Scope.PROGRAMS_ADMIN,
    f"/{_PROGRAMS}/GetProgram": Scope.PROGRAMS_READ,
    f"/{_PROGRAMS}/GetEarningRule": Scope.PROGRAMS_READ,
    f"/{_PROGRAMS}/ListPrograms": Scope.PROGRAMS_READ,
    f"/{_PROGRAMS}/UpdateProgram": Scope.PROGRAMS_ADMIN,
    f"/{_EVENTS}/ListEvents": Scope.EVENTS_READ,
}
