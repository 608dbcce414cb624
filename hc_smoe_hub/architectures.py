"""Compatibility re-export: the family table now lives in the `hc_smoe_hub.arch` package."""

from hc_smoe_hub.arch import SPECS, ArchSpec, spec_for, supported_families, supported_table

__all__ = ["SPECS", "ArchSpec", "spec_for", "supported_families", "supported_table"]
