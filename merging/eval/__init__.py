"""The judge, verify, held-out losses, compare and tune."""
