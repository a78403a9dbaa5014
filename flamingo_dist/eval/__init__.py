"""Few-shot evaluation (issue 6): scorers so far; tasks, protocol and generation loops to come."""
