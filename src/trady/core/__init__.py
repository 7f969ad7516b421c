"""The lowest tier: errors, formatting, atomic files, the learning-rate schedule, the process group.

Imports nothing else of trady; every other package may import it.
"""
