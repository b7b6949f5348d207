"""Adapters for HTTP: the ASGI application, the TLS server runner and the SOAP client."""
