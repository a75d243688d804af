"""Network definitions (torch imported at module top level: only backend loaders import these)."""
