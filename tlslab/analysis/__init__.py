"""Analyses built on runs: questions the 2004 thread could not answer."""
