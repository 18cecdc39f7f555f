"""Generation: sampling with adapters at their strengths (`sample`) and best-of-K candidates picked by the
adapters themselves (`rerank`)."""

from .sample import AdapterSpec, detail_spec, generate, generation_units, load_adapters, parse_adapter_arg

__all__ = ["AdapterSpec", "detail_spec", "generate", "generation_units", "load_adapters", "parse_adapter_arg"]
