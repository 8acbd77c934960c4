"""One module per graph node: small functions (state, runtime) -> partial state update."""
