"""Differential-privacy accounting, the per-enterprise privacy ledger, budgets, distributed DP."""
