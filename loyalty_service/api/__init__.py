"""The gRPC layer: servicers and their request parsing, messages, paging, streams, errors."""

from .accounts import LoyaltyAccounts
from .events import LoyaltyEvents
from .points import PointsLedger
from .programs import LoyaltyPrograms

__all__ = ["LoyaltyAccounts", "LoyaltyEvents", "LoyaltyPrograms", "PointsLedger"]
