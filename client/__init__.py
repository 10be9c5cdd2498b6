"""carrecog command-line client."""
