"""The embedded demo model: a tiny GPT-Neo with RANDOM weights and a byte-level tokenizer, built
offline (no model hub) and cached on first use. Its output is gibberish by construction; it
exists so the Serve app, the tests and the README's curl run on any machine.
"""
import os
from pathlib import Path

MODEL_NAME = "tiny-gpt-neo-random-weights"
BOS, EOS, PAD = 256, 257, 258
VOCAB = 320
CHAT_TEMPLATE = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<assistant>{% endif %}")


def _bytes_to_unicode() -> list[str]:
    """GPT-2's byte -> printable character table, in byte order."""
    printable = set(range(ord("!"), ord("~") + 1)) | set(range(ord("¡"), ord("¬") + 1)) | \
        set(range(ord("®"), ord("ÿ") + 1))
    chars, extra = [], 0
    for b in range(256):
        if b in printable:
            chars.append(chr(b))
        else:
            chars.append(chr(256 + extra))
            extra += 1
    return chars


def byte_tokenizer():
    """Byte-level tokenizer: ids 0..255 are the bytes, then <bos>, <eos>, <pad>; no merges."""
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {ch: b for b, ch in enumerate(_bytes_to_unicode())}
    vocab.update({"<bos>": BOS, "<eos>": EOS, "<pad>": PAD})
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>",
                                                pad_token="<pad>", padding_side="left",
                                                chat_template=CHAT_TEMPLATE, model_max_length=256)


def build(path: str, seed: int = 0) -> str:
    """Write the demo model (config, random weights, tokenizer) as an HF directory at `path`."""
    import torch
    import transformers

    config = transformers.GPTNeoConfig(
        vocab_size=VOCAB, hidden_size=128, num_layers=4, num_heads=4, intermediate_size=512,
        attention_types=[[["global", "local"], 2]], window_size=64, max_position_embeddings=256,
        bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD, initializer_range=0.1)
    torch.manual_seed(seed)
    model = transformers.GPTNeoForCausalLM(config).eval()
    model.generation_config.pad_token_id = PAD
    model.save_pretrained(path)
    byte_tokenizer().save_pretrained(path)
    return path


def demo_checkpoint() -> str:
    """The demo model's directory, built once under $RAYSPEED_CACHE (default ~/.cache/rayspeed)."""
    root = Path(os.environ.get("RAYSPEED_CACHE", Path.home() / ".cache" / "rayspeed"))
    path = root / MODEL_NAME
    if not (path / "config.json").exists():
        tmp = root / f".{MODEL_NAME}.{os.getpid()}"
        build(str(tmp))
        tmp.replace(path) if not path.exists() else None
    return str(path)
