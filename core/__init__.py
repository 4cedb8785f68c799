"""The small shared kernel: settings, dataset contracts, lake access, the feature transform.

Nothing heavy is imported here at module import time.
"""
