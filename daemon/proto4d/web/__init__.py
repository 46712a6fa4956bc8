"""`proto4d web`: the status page and /metrics, in a process of its own that reads the state files.

It never talks to the daemon: everything comes from the files under `root` (status.json,
journal.json, activity.jsonl, the update logs, answers, releases), so the daemon keeps its
memory target and a crash or restart of either leaves the other alone.
"""
