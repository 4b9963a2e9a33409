"""vLLM's `vllm.utils` names that scripts import (`from ember.utils import
FlexibleArgumentParser`)."""

from ember.utils.argparse_utils import FlexibleArgumentParser

__all__ = ["FlexibleArgumentParser"]
