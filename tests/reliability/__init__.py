"""Reliability suite (issue 9): load, faults, hostile input and security, against a served raywatch app."""
