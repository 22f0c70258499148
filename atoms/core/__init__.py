"""The ground every stage stands on: error types, typed configs loaded from YAML and checked
when they load, input validation, atomic writes and the code version, and the command-line
plumbing of the entry points (``--help`` lists every config field).

May import nothing else from atoms.
"""
