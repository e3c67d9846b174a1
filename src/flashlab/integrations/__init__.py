"""Integrations of flashlab with other libraries (imported on demand, never by ``import flashlab``)."""
