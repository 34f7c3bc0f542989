"""Lottery-ticket experiments: IMP with rewinding and its controls, linear mode connectivity and instability analysis."""
