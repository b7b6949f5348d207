"""PACS backends: one small interface (:mod:`gateway.pacs.base`) and its adapters."""
