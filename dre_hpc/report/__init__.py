"""Run reports: the HTML page and its figures, a gallery of fits, validation against simulated truth."""
