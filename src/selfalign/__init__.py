"""selfalign: self-alignment of LLMs for harmlessness, measured against what it costs in helpfulness."""

__version__ = "0.1.0"
