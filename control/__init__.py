"""The control plane: cutover state machine, gates, audit trail, mapping-aware verify and the
monitor. It may import the core (``cutover``) and nothing above it."""
