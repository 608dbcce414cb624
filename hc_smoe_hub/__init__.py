"""hc-smoe-hub: merge the experts of a Mixture-of-Experts checkpoint (HC-SMoE) and publish the smaller model."""

from hc_smoe_hub.host_memory import bound_primitive_cache

bound_primitive_cache()  # before oneDNN first runs, or it is too late (host_memory.py says why)

__version__ = "0.1.0"
