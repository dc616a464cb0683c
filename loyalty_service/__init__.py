"""VINR loyalty ledger: loyalty accounts and an append-only points ledger over gRPC."""
