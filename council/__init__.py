"""The council that approves or denies GPU requests: plain Python, numpy to decide, torch to
train (and for the torch model itself); no LangGraph."""
