"""hc-smoe-hub: merge the experts of a Mixture-of-Experts checkpoint (HC-SMoE) and publish the smaller model."""

__version__ = "0.1.0"
