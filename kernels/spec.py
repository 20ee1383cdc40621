"""`ModelSpec`: everything the injected decoder needs to know about a model family, as plain data.

A policy (policies/) reads an HF config and fills one of these; the layers here read nothing else.
"""
from dataclasses import dataclass


@dataclass(frozen=True)
class ModelSpec:
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int                      # total, before tensor parallelism
    num_kv_heads: int                   # total; < num_heads means grouped-query attention
    head_dim: int
    intermediate_size: int
    max_positions: int
    norm: str                           # "layer" | "rms"
    norm_eps: float
    activation: str                     # a name in kernels.activation.ACTIVATIONS
    gated_mlp: bool                     # SwiGLU-style: act(gate(x)) * up(x)
    positional: str                     # "learned" | "rotary" | "alibi"
    attn_scales: tuple[float, ...]      # per layer; GPT-Neo uses 1.0 (unscaled)
    attn_windows: tuple[int | None, ...]  # per layer; keys visible to a query, None = all
    qkv_bias: bool = False
    out_bias: bool = False
    mlp_bias: bool = False
    norm_bias: bool = True              # LayerNorm bias (RMSNorm has none)
    tie_word_embeddings: bool = True
    position_offset: int = 0            # learned positions: row = position + offset (OPT uses 2)
    rotary_inv_freq: tuple[float, ...] = ()   # rotary_dim / 2 inverse frequencies
    rotary_scaling: float = 1.0         # multiplies cos and sin (YaRN-style attention factor)
    rotary_interleaved: bool = False    # GPT-J pairs (2i, 2i+1); NeoX/Llama pair (i, i + d/2)
    parallel_residual: bool = False     # x + attn(norm1(x)) + mlp(norm2(x))
    shared_norm: bool = False           # parallel residual with one norm: x + attn(norm(x)) + mlp(norm(x))
    post_norm: bool = False             # norm after each residual add: x = norm(x + f(x)) (OPT-350m)
    final_norm: bool = True             # a norm after the last block
    embed_norm: bool = False            # a norm right after the embeddings (BLOOM)
    lm_head_bias: bool = False          # the LM head adds a bias (GPT-J, Phi)
    embed_proj_dim: int | None = None   # token embeddings / LM head this wide, projected to and from hidden (OPT)

    def __post_init__(self):
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}")
        for name in ("attn_scales", "attn_windows"):
            if len(getattr(self, name)) != self.num_layers:
                raise ValueError(f"{name} has {len(getattr(self, name))} entries, expected num_layers={self.num_layers}")
        if self.positional == "rotary" and not self.rotary_inv_freq:
            raise ValueError("positional='rotary' needs rotary_inv_freq")
        if self.shared_norm and not self.parallel_residual:
            raise ValueError("shared_norm needs parallel_residual (one norm feeding attention and MLP side by side)")
        if self.post_norm and self.parallel_residual:
            raise ValueError("post_norm and parallel_residual do not combine")

    def check_tp(self, tp_size: int) -> None:
        """Raise ValueError unless heads and MLP split evenly across `tp_size` ranks."""
        problems = []
        if self.num_heads % tp_size:
            problems.append(f"num_heads={self.num_heads}")
        if self.num_kv_heads % tp_size and tp_size % self.num_kv_heads:
            problems.append(f"num_kv_heads={self.num_kv_heads} (nor does it divide tp_size)")
        if self.intermediate_size % tp_size:
            problems.append(f"intermediate_size={self.intermediate_size}")
        if problems:
            raise ValueError(f"tp_size={tp_size} does not divide {', '.join(problems)}")

    @property
    def rotary_dim(self) -> int:
        return 2 * len(self.rotary_inv_freq)

    @property
    def embed_dim(self) -> int:
        """Width of the token embeddings and of the LM head's input."""
        return self.embed_proj_dim or self.hidden_size
