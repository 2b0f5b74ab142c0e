"""Run reports: validation against simulated truth (figures and HTML to come)."""
