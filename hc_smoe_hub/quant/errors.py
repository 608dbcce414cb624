"""The one error of the quant package: a quantization method or tensor this package cannot read or write."""

from hc_smoe_hub.errors import HcSmoeError


class UnsupportedQuantizationError(HcSmoeError):
    """The checkpoint's quantization method or its tensors are not in a format this package reads."""
