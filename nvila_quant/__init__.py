"""nvila-quant: AWQ int4 quantization, int4 kernels, ONNX export and a runtime for NVILA VLMs."""

from nvila_quant.errors import CheckpointError, MediaError, NVILAError, OutputExistsError, PromptError

__version__ = "0.1.0"

__all__ = ["CheckpointError", "MediaError", "NVILAError", "OutputExistsError", "PromptError", "__version__"]
