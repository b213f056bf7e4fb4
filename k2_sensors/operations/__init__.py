"""Operations sensors: alerting on failed asset checks through webhooks (``alerts``).

The sensor and its webhook resource are registered with the other definitions, one layer up.
"""
