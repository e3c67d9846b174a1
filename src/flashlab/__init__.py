"""flashlab: FlashAttention-2 in Triton, and a lab that benchmarks attention implementations."""

from flashlab.block_mask import BlockMask, block_mask
from flashlab.decoding import flash_attn_with_kvcache
from flashlab.interface import flash_attn_func, flash_attn_varlen_func, scaled_dot_product_attention
from flashlab.layer import Attention
from flashlab.modules import MultiheadAttention
from flashlab.packed import (
    flash_attn_kvpacked_func,
    flash_attn_qkvpacked_func,
    flash_attn_varlen_kvpacked_func,
    flash_attn_varlen_qkvpacked_func,
)
from flashlab.rotary import RotaryEmbedding, apply_rotary

__version__ = "0.1.0"

__all__ = ["Attention", "BlockMask", "MultiheadAttention", "RotaryEmbedding", "__version__", "apply_rotary",
           "block_mask", "flash_attn_func", "flash_attn_kvpacked_func", "flash_attn_qkvpacked_func",
           "flash_attn_varlen_func", "flash_attn_varlen_kvpacked_func", "flash_attn_varlen_qkvpacked_func",
           "flash_attn_with_kvcache", "scaled_dot_product_attention"]
