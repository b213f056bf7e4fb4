"""Helpers shared by the test modules (data, producers, waiting, servers); no tests here."""
