"""Finished investigations, each frozen with its script, results and finding."""
