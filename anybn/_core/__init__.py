"""The formulas of batch norm, written once: statistics, the generic kernel, the results."""
