"""Tiny random-weight HF models (hidden <= 128, <= 4 layers) built offline, and the byte-level tokenizer."""
import torch
import transformers as tf

from serve_apps.demo_model import BOS, EOS, PAD, VOCAB, byte_tokenizer  # noqa: F401  (re-exported)

CONFIGS = {
    # GPT-Neo: a local window (8) shorter than the test sequences, so local attention matters
    "gpt_neo": lambda: tf.GPTNeoConfig(
        vocab_size=VOCAB, hidden_size=64, num_layers=4, num_heads=4, window_size=8,
        attention_types=[[["global", "local"], 2]], max_position_embeddings=256, intermediate_size=128),
    "gpt2": lambda: tf.GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=3, n_head=4, n_positions=256),
    # Llama with grouped-query attention: 4 heads over 2 KV heads
    "llama": lambda: tf.LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=128, max_position_embeddings=256),
    "mistral": lambda: tf.MistralConfig(
        vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=1,
        head_dim=16, intermediate_size=128, max_position_embeddings=256, sliding_window=12),
    "qwen2": lambda: tf.Qwen2Config(
        vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=128, max_position_embeddings=256, tie_word_embeddings=True),
    # OPT pre-norm with bias-free linears; OPT-350m style: post-norm, narrower token embeddings (48)
    "opt": lambda: tf.OPTConfig(
        vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, ffn_dim=128,
        max_position_embeddings=256, word_embed_proj_dim=64, enable_bias=False),
    "opt_post": lambda: tf.OPTConfig(
        vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, ffn_dim=128,
        max_position_embeddings=256, word_embed_proj_dim=48, do_layer_norm_before=False),
    # partial rotary: 8 of 16 channels per head (interleaved for GPT-J, rotate-half for NeoX and Phi)
    "gptj": lambda: tf.GPTJConfig(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, rotary_dim=8, n_positions=256),
    "gpt_neox": lambda: tf.GPTNeoXConfig(
        vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
        max_position_embeddings=256, rotary_pct=0.5),
    "gpt_neox_seq": lambda: tf.GPTNeoXConfig(
        vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
        max_position_embeddings=256, rotary_pct=0.25, use_parallel_residual=False),
    # 6 heads: ALiBi's extra slopes for a head count that is not a power of two
    "bloom": lambda: tf.BloomConfig(vocab_size=VOCAB, hidden_size=96, n_layer=2, n_head=6, seq_length=256),
    "phi": lambda: tf.PhiConfig(
        vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=128, max_position_embeddings=256, partial_rotary_factor=0.5),
}
CLASSES = {"gpt_neo": tf.GPTNeoForCausalLM, "gpt2": tf.GPT2LMHeadModel, "llama": tf.LlamaForCausalLM,
           "mistral": tf.MistralForCausalLM, "qwen2": tf.Qwen2ForCausalLM, "opt": tf.OPTForCausalLM,
           "opt_post": tf.OPTForCausalLM, "gptj": tf.GPTJForCausalLM, "gpt_neox": tf.GPTNeoXForCausalLM,
           "gpt_neox_seq": tf.GPTNeoXForCausalLM, "bloom": tf.BloomForCausalLM, "phi": tf.PhiForCausalLM}


def tiny_model(family: str, seed: int = 0, **config_overrides) -> torch.nn.Module:
    """A random-weight HF causal LM; weights drawn wider than HF's default so logits are not flat."""
    config = CONFIGS[family]()
    for name, value in config_overrides.items():
        setattr(config, name, value)
    config.bos_token_id, config.eos_token_id, config.pad_token_id = BOS, EOS, PAD
    config.initializer_range = 0.1
    torch.manual_seed(seed)
    model = CLASSES[family](config).eval()
    with torch.no_grad():   # HF starts biases at 0 and norm weights at 1: perturb them so their loading is tested
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(torch.randn(p.shape) * 0.1)
    model.generation_config.pad_token_id = PAD
    return model
