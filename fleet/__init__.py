"""The domain: catalog, inventory backends, ledger, scheduling, budgets, topology.

Plain Python; never imports LangGraph.
"""
