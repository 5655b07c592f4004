"""The attribution engine, its methods and the step functions."""
