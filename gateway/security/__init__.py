"""Security: TLS contexts, test certificates, XUA SAML assertions and the WS-Security header."""
