"""Megatron-LM GPT checkpoints (`mp_rank_XX/model_optim_rng.pt`, one file per model-parallel rank),
loaded onto the injected GPT-2 model (learned positions, LayerNorm, gelu) at any TP degree.

Names after flattening the nested state dict under `model` (Megatron-DeepSpeed: `module`); older
files' `transformer.` and `attention.` read as `encoder.` and `self_attention.`. Shapes of shard s of M:
    language_model.embedding.word_embeddings.weight      [padded_vocab / M, h]  vocab-parallel (dim 0)
    language_model.embedding.position_embeddings.weight  [positions, h]         replicated
    language_model.encoder.layers.N.input_layernorm.{weight,bias}              replicated
      .self_attention.query_key_value.{weight,bias}      [3h / M, h]            column (dim 0), fused QKV
      .self_attention.dense.weight                       [h, h / M]             row (dim 1); bias replicated
      .post_attention_layernorm.{weight,bias}                                   replicated
      .mlp.dense_h_to_4h.{weight,bias}                   [4h / M, h]            column (dim 0)
      .mlp.dense_4h_to_h.weight                          [h, 4h / M]            row (dim 1); bias replicated
    language_model.encoder.final_layernorm.{weight,bias}                       replicated
    language_model.output_layer.weight (untied only)     [padded_vocab / M, h]  vocab-parallel
Megatron pads the vocabulary to a multiple of make_vocab_size_divisible_by * M rows; rows past the
config's vocab_size are dropped. Weights are [out, in] (nn.Linear), as the injected model's.

Fused QKV rows of one shard (np = heads / M local heads, hn = head_dim), by the file's
`checkpoint_version` (Megatron's `fix_query_key_value_ordering` converts versions 0 and 1 to 2 on load):
    version 0:    [3, np, hn]   q of every local head, then k, then v (our per-rank [q_s; k_s; v_s])
    version 1:    [np, hn, 3]   q, k, v interleaved row by row inside each head
    version >= 2: [np, 3, hn]   per head: its q block, k block, v block
Each shard is seen as [q_s; k_s; v_s] through per-head views of the memory-mapped tensor (no copy);
then shards merge or split like any other (`actors.reshard`). Every rank maps every file: the word
embeddings are vocab-parallel and replicated here; of the other tensors it reads only its slices.
"""
import argparse

import torch
import transformers

from actors.loader import CheckpointError
from actors.reshard import InjectedNames, check_shape, full_view, layouts, shard_sources
from actors.tensor_files import DescribedCheckpoint, TensorFiles
from actors.tensor_views import ConcatTensor
from policies.registry import policy_for

ALLOWED_CLASSES = (argparse.Namespace,)         # Megatron saves its training args as a Namespace
PREFIX = "language_model."
TOP_NAMES = {"embed.weight": "embedding.word_embeddings.weight",
             "pos_embed.weight": "embedding.position_embeddings.weight",
             "norm.weight": "encoder.final_layernorm.weight", "norm.bias": "encoder.final_layernorm.bias",
             "lm_head": "output_layer.weight"}
LAYER_NAMES = {"attn_norm": "input_layernorm", "attn.qkv": "self_attention.query_key_value",
               "attn.out": "self_attention.dense", "mlp_norm": "post_attention_layernorm",
               "mlp.up": "mlp.dense_h_to_4h", "mlp.down": "mlp.dense_4h_to_h"}
VOCAB_PARALLEL = ("embed.weight", "lm_head")
OLD_NAMES = ((".transformer.", ".encoder."), (".attention.", ".self_attention."))


def megatron_name(ours: str) -> str:
    """The Megatron tensor an injected parameter is loaded from."""
    if ours in TOP_NAMES:
        return PREFIX + TOP_NAMES[ours]
    _, index, rest = ours.split(".", 2)                        # layers.N.<module>.<weight|bias>
    module, kind = rest.rsplit(".", 1)
    return f"{PREFIX}encoder.layers.{index}.{LAYER_NAMES[module]}.{kind}"


def read_shard(files: TensorFiles, url: str) -> dict:
    """One Megatron file: {"tensors": {normalised name: tensor}, "version": float | None, "args": ...}."""
    state = files.load(url, ALLOWED_CLASSES)
    model = state.get("model", state.get("module")) if isinstance(state, dict) else None
    if not isinstance(model, dict):
        found = sorted(state)[:8] if isinstance(state, dict) else type(state).__name__
        raise CheckpointError(f"{url}: expected a Megatron checkpoint (a dict with 'model' or 'module'), found {found}")
    tensors = {_normalise(name): t for name, t in _flatten(model, "")}
    return {"tensors": tensors, "version": state.get("checkpoint_version"), "args": state.get("args")}


def _flatten(tree: dict, prefix: str):
    for key, value in tree.items():
        if isinstance(value, dict):
            yield from _flatten(value, f"{prefix}{key}.")
        elif isinstance(value, torch.Tensor):
            yield f"{prefix}{key}", value


def _normalise(name: str) -> str:
    name = "." + name
    for old, new in OLD_NAMES:
        name = name.replace(old, new)
    return name[1:]


def config_from_args(args, url: str) -> dict:
    """A GPT-2 config (as a dict) from a Megatron file's training `args`, as HF's converter builds it."""
    need = ("num_layers", "hidden_size", "num_attention_heads", "max_position_embeddings", "padded_vocab_size")
    missing = [key for key in need if getattr(args, key, None) is None]
    if args is None or missing:
        raise CheckpointError(f"{url}: no model config: the file's args lack {missing or 'everything'}; pass "
                              "the model config (init_inference(config, ...)) or put config.json next to it")
    check_gpt2_args(args, url)
    activation = ("gelu_fast" if getattr(args, "bias_gelu_fusion", False) else
                  "gelu_new" if getattr(args, "openai_gelu", False) else "gelu")
    return transformers.GPT2Config(
        vocab_size=args.padded_vocab_size, n_positions=args.max_position_embeddings, n_embd=args.hidden_size,
        n_layer=args.num_layers, n_head=args.num_attention_heads, n_inner=getattr(args, "ffn_hidden_size", None),
        activation_function=activation, layer_norm_epsilon=getattr(args, "layernorm_epsilon", 1e-5),
        tie_word_embeddings=not getattr(args, "untie_embeddings_and_output_weights", False)).to_dict()


def check_gpt2_args(args, url: str) -> None:
    """Refuse Megatron models that are not GPT-2 shaped (rotary, SwiGLU, RMSNorm, no biases, ...)."""
    fine = {"position_embedding_type": ("learned_absolute", None), "swiglu": (False, None),
            "normalization": ("LayerNorm", None), "add_bias_linear": (True, None),
            "apply_residual_connection_post_layernorm": (False, None), "group_query_attention": (False, None),
            "pipeline_model_parallel_size": (1, None)}
    for key, values in fine.items():
        value = getattr(args, key, None)
        if value not in values:
            raise CheckpointError(f"{url}: args.{key}={value!r}: only GPT-2-shaped Megatron GPT models without "
                                  "pipeline parallelism load (learned positions, LayerNorm, gelu, biases)")


def qkv_heads(t: torch.Tensor, heads: int, head_dim: int, version: float) -> list[torch.Tensor]:
    """One shard's fused QKV as [hn, ...] views (of a contiguous `t`), q of every local head, then k, then v
    (see the module doc)."""
    rest = t.shape[1:]
    if version == 0:
        blocks = t.reshape(3, heads, head_dim, *rest)
        return [blocks[p, h] for p in range(3) for h in range(heads)]
    if version == 1:
        blocks = t.reshape(heads, head_dim, 3, *rest)
        return [blocks[h, :, p] for p in range(3) for h in range(heads)]
    blocks = t.reshape(heads, 3, head_dim, *rest)
    return [blocks[h, p] for p in range(3) for h in range(heads)]


class MegatronCheckpoint(DescribedCheckpoint):
    """One rank's view of a Megatron GPT checkpoint: resolved description with `files` (one per
    model-parallel rank, in rank order) and the GPT-2 `config`."""

    def policy(self) -> InjectedNames:
        return InjectedNames()

    def __len__(self) -> int:
        return len(layouts(self._spec()))

    def tensors(self):
        spec, urls = self._spec(), self.description["files"]
        shards = [self._open(s) for s in range(len(urls))]
        version = self._version(shards)
        prefer = shard_sources(self.rank, self.tp_size, len(urls))
        for name, layout in layouts(spec).items():
            source = megatron_name(name)
            if name in VOCAB_PARALLEL:
                yield name, self._vocab(shards, source, layout.shape)
            elif layout.dim is None:
                what = f"replicated, for {name}"
                yield name, self._mapped(self._tensor(shards, prefer.start, source, layout.shape, what))
            else:
                views = [self._shard_view(shards, s, source, layout, spec, version, name) for s in range(len(urls))]
                yield name, full_view(views, layout, prefer)

    def _spec(self):
        config = self.hf_config()
        return policy_for(config).spec(config)

    def _open(self, shard: int) -> dict:
        url, num_shards = self.description["files"][shard], len(self.description["files"])
        state = read_shard(self.files, url)
        args = state["args"]
        if args is not None:
            check_gpt2_args(args, url)
            saved = getattr(args, "tensor_model_parallel_size", getattr(args, "model_parallel_size", None))
            if saved not in (None, num_shards):
                raise CheckpointError(f"{url}: args.tensor_model_parallel_size={saved}, but the description lists "
                                      f"{num_shards} file(s): one per model-parallel rank")
        return state

    def _version(self, shards: list[dict]) -> float:
        """The files' checkpoint_version (all alike), else the description's `version`, else 0."""
        versions = {s["version"] for s in shards}
        if len(versions) > 1:
            raise CheckpointError(f"{self.description['source']}: files disagree on checkpoint_version: {versions}")
        version = versions.pop()
        return float(version if version is not None else self.description.get("version") or 0)

    def _tensor(self, shards: list[dict], shard: int, name: str, expected: tuple | None, what: str) -> torch.Tensor:
        url, tensors = self.description["files"][shard], shards[shard]["tensors"]
        if name not in tensors:
            raise CheckpointError(f"{url}: tensor {name!r} ({what}) missing; the file has {len(tensors)} tensors, "
                                  f"e.g. {', '.join(sorted(tensors)[:4])}")
        return check_shape(url, name, tensors[name], expected, what) if expected else tensors[name]

    def _mapped(self, tensor: torch.Tensor):
        return self.files.mapped_view(tensor)

    def _shard_view(self, shards, s: int, name: str, layout, spec, version: float, ours: str):
        """Shard s of a split tensor; a fused QKV seen as [q_s; k_s; v_s] through per-head views."""
        what = f"shard {s} of {len(shards)}, for {ours}"
        t = self._tensor(shards, s, name, layout.shard_shape(s, len(shards)), what)
        if ".query_key_value." not in name:
            return self._mapped(t)
        heads = spec.num_heads // len(shards)
        return ConcatTensor([self._mapped(b) for b in qkv_heads(t, heads, spec.head_dim, version)], 0)

    def _vocab(self, shards: list[dict], name: str, shape: tuple):
        """The vocab-parallel embedding (or output layer): every shard's rows, padding dropped."""
        parts = [self._tensor(shards, s, name, None, f"shard {s} of {len(shards)}") for s in range(len(shards))]
        url = self.description["files"][0]
        if any(tuple(p.shape[1:]) != tuple(shape[1:]) or p.shape[0] != parts[0].shape[0] for p in parts):
            raise CheckpointError(f"{url}: tensor {name!r}: expected {len(parts)} shards of equal rows by {shape[1]}, "
                                  f"found {[tuple(p.shape) for p in parts]}")
        rows = sum(p.shape[0] for p in parts)
        if rows < shape[0]:
            raise CheckpointError(f"{url}: tensor {name!r}: {rows} rows over {len(parts)} shard(s), fewer than "
                                  f"the config's vocab_size={shape[0]}")
        return ConcatTensor([self._mapped(p) for p in parts], 0).narrow(0, 0, shape[0])
