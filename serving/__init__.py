"""The BentoML service: champion/challenger serving, prediction and feedback logging."""
