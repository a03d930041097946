"""Model components, one module per component."""
