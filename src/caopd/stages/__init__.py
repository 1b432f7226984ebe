"""The five stage functions (plus data preparation); each takes a typed config and writes one output folder."""
