"""Quantizing until the user's own metric is satisfied: evaluators, built-in goals and the searches that use them."""
