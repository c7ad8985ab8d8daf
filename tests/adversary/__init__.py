"""Adversarial security testing of the segment model (issue #4 item 5): see tests/test_security.py."""
