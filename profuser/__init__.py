"""ProFuser: fuse several source chat LLMs into one target (prep -> train -> eval, `profuser --help`).

The package root must never import anything, so `import profuser.<module>` pays only for that module.
"""
