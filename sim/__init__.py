"""Virtual-time evaluation: scenarios (and, later, trace replays) through the real graph."""
