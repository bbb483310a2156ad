"""mmla: the MMLA benchmark (multimodal language analysis with LLMs and MLLMs), reproduced end to end."""

__version__ = "0.1.0"
