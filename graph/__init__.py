"""The public face: the compiled graph, the Orchestrator API and the `gpu-agent` command."""
