"""The council that approves or denies GPU requests. Plain Python and torch; no LangGraph."""
