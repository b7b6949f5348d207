"""Responding-gateway services: what XIG answers when a partner community queries it."""
