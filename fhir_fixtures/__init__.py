"""Synthetic FHIR R4 transaction Bundles (see README.md here); shipped as package data for load-fixtures."""
