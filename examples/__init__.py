"""Runnable recipes (docs/recipes/): each module is complete code a test in tests/test_recipes.py runs."""
