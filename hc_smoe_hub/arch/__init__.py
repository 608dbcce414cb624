"""The architecture layer: a table of MoE families as data (`table.SPECS`), each row naming small strategies.

`spec.py` holds the row type, `strategies.py` the named strategies (routing scores, dense layers, extra MTP
layers), `storage.py` how the routed experts are stored on disk, `table.py` the rows and the refusal.
"""

from hc_smoe_hub.arch.spec import ArchSpec
from hc_smoe_hub.arch.storage import ExpertStorage, Fused, PerExpert
from hc_smoe_hub.arch.strategies import DenseLayers, ExtraLayers, Scoring
from hc_smoe_hub.arch.table import SPECS, spec_for, supported_families, supported_table

__all__ = ["SPECS", "ArchSpec", "DenseLayers", "ExpertStorage", "ExtraLayers", "Fused", "PerExpert", "Scoring",
           "spec_for", "supported_families", "supported_table"]
