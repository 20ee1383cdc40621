"""`TextStream`: token deltas -> text, incrementally. Whatever the chunking, the text equals the whole
output's decode (byte-level BPE with random bytes, invalid UTF-8 included; a SentencePiece-style
tokenizer whose decode drops a leading space and fuses byte-fallback tokens); stop strings cut it
exactly; and a push decodes a bounded window, not the whole output. `text_encoder` gives the wrapper's
ids, and a chat prompt gets no second BOS from the tokenizer when its template writes one."""
import random

import pytest
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

from serve_apps.demo_model import EOS, byte_tokenizer
from serve_apps.protocol import ChatRequest
from serve_apps.server import LLMServer
from serve_apps.text_stream import TextStream, text_encoder, window_decoder


def streamed(tokenizer, ids: list[int], sizes, stops=()) -> tuple[str, TextStream]:
    """The text a stream returns for `ids` pushed in deltas of the given sizes (cycled), last one final."""
    stream, out, i = TextStream(window_decoder(tokenizer), list(stops)), [], 0
    sizes = iter(sizes)
    while i < len(ids) and not stream.stopped:
        step = next(sizes)
        out.append(stream.push(ids[i:i + step], final=i + step >= len(ids)))
        i += step
    return "".join(out), stream


def sentencepiece_like():
    """A Llama-style tokenizer: metaspace words, byte-fallback tokens <0x00>..<0xFF>, a decoder that
    turns the metaspace into spaces, fuses bytes into characters and strips the text's first space."""
    pieces = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    pieces += ["▁", "▁Hello", "▁world", "▁again", "▁caf", "é", "s"]
    vocab = [(p, 0.0 if i < 259 else -float(len(pieces) - i)) for i, p in enumerate(pieces)]
    tok = Tokenizer(models.Unigram(vocab, unk_id=0, byte_fallback=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                                unk_token="<unk>")


@pytest.mark.parametrize("seed", range(6))
def test_random_bytes_in_random_deltas_equal_the_whole_decode(seed):
    tok, rng = byte_tokenizer(), random.Random(seed)
    ids = [rng.randrange(EOS + 1) for _ in range(rng.randrange(1, 300))]       # bytes, <bos>, <eos>
    text, _ = streamed(tok, ids, (rng.randint(1, 4) for _ in iter(int, 1)))
    assert text == tok.decode(ids, skip_special_tokens=True)


def test_multibyte_characters_are_never_split():
    tok = byte_tokenizer()
    ids = tok("naïve café: 3 € and 😀, ok")["input_ids"]
    stream, chunks = TextStream(window_decoder(tok), []), []
    for i, token in enumerate(ids):
        chunks.append(stream.push([token], final=i == len(ids) - 1))
    assert "".join(chunks) == "naïve café: 3 € and 😀, ok"
    assert not any("\ufffd" in c for c in chunks)
    assert chunks[ids.index(0xF0):ids.index(0xF0) + 4] == ["", "", "", "😀"]    # 4 bytes, one character


def test_sentencepiece_leading_spaces_and_byte_fallback():
    tok = sentencepiece_like()
    ids = tok("Hello world café again 😀 cafés")["input_ids"] + [tok.eos_token_id]
    assert {"▁Hello", "▁world", "<0xF0>"} <= set(tok.convert_ids_to_tokens(ids))   # words; 😀 as 4 bytes
    assert tok.decode(tok.convert_tokens_to_ids(["▁world"])) == "world"              # a decode's first space goes
    expected = tok.decode(ids, skip_special_tokens=True)
    assert expected == "Hello world café again 😀 cafés"
    for sizes in ([1], [2], [3, 1], [5]):
        text, _ = streamed(tok, ids, iter(sizes * len(ids)))
        assert text == expected, sizes


def test_stop_strings_cut_exactly_and_hold_back_what_could_become_one():
    tok = byte_tokenizer()
    ids = tok("Hello world, again")["input_ids"]
    stream, chunks = TextStream(window_decoder(tok), ["wor", "xyz"]), []
    for token in ids:
        chunks.append(stream.push([token], final=False))
        if stream.stopped:
            break
    assert "".join(chunks) == "Hello " and stream.stopped
    assert "Hello w" not in "".join(chunks[:-1])                # "w" waited: it could start "wor"
    text, stopped = streamed(tok, ids, iter([3] * 10), stops=["ld, a"])     # across deltas
    assert text == "Hello wor" and stopped.stopped
    text, stopped = streamed(tok, ids, iter([2] * 10), stops=["zz"])
    assert text == "Hello world, again" and not stopped.stopped


def test_each_push_decodes_a_bounded_window():
    """The old stream decoded the whole output on every push: 2,000 tokens cost 2 million decoded."""
    tok = byte_tokenizer()
    decode, decoded = window_decoder(tok), []

    def counting(ids):
        decoded.append(len(ids))
        return decode(ids)
    stream = TextStream(counting, ["never"])
    ids = tok("the quick brown fox jumps over the lazy dog " * 50)["input_ids"][:2000]
    text = "".join(stream.push([t], final=False) for t in ids) + stream.push([], final=True)
    assert text == tok.decode(ids)
    assert sum(decoded) <= 4 * len(ids), sum(decoded)


def test_window_decoder_matches_the_tokenizers_decode():
    for tok in (byte_tokenizer(), sentencepiece_like()):
        ids = list(range(0, 300, 7)) + [2, 257]
        assert window_decoder(tok)(ids) == tok.decode(ids, skip_special_tokens=True)


def with_bos(tok):
    """`tok` whose backend adds <s> before every text (Llama's post-processor), with a chat template that
    writes <s> itself, as Llama-2's does."""
    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tok.chat_template = "{{ bos_token }}{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }} {% endfor %}"
    return tok


@pytest.mark.parametrize("make", [byte_tokenizer, sentencepiece_like, lambda: with_bos(sentencepiece_like())])
def test_text_encoder_matches_the_tokenizer(make):
    tok = make()
    encode = text_encoder(tok)
    assert encode.__name__ == "direct"                  # the backend's path where it agrees on the probe
    for text in ("Hello world again", " cafés\n", "", "<s> Hello"):
        for special in (True, False):
            assert encode(text, special) == tok(text, add_special_tokens=special)["input_ids"]


def test_a_disagreeing_backend_falls_back_to_the_wrapper():
    class Lowering(transformers.PreTrainedTokenizerFast):
        def __call__(self, text, **kwargs):             # what the backend does not know about
            return super().__call__(text.lower(), **kwargs)

    tok = Lowering(tokenizer_object=byte_tokenizer().backend_tokenizer, bos_token="<bos>", eos_token="<eos>")
    encode = text_encoder(tok)
    assert encode.__name__ == "wrapped" and encode("AbC") == tok("AbC")["input_ids"]


def test_a_chat_prompt_has_one_bos():
    tok = with_bos(sentencepiece_like())
    server = LLMServer(None, tok, "m", transformers.GenerationConfig(eos_token_id=2), max_model_len=256)
    ids = server.chat_prompt(ChatRequest(messages=[{"role": "user", "content": "Hello world"}]))
    assert ids[:2] != [1, 1] and ids.count(1) == 1 and ids[0] == 1
    assert server.encode("Hello")[0][0] == 1            # a completion's text still gets it
