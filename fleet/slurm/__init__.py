"""Slurm: its commands and what they answer (cluster), and the inventory backend that holds an
allocation's GPUs as a Slurm job (backend)."""
