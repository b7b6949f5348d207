"""SOAP 1.2 codecs: envelope, WS-Addressing, faults, MTOM/XOP, hardened XML, XSD validation.

Everything in this package is pure (bytes/XML in, typed models out); no I/O.
"""
