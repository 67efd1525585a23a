"""The embedded demo model: Z-Image's real architecture at toy size, random weights, built offline.

Every class is the one a real Z-Image-Turbo checkpoint loads (ZImageTransformer2DModel, Qwen3Model,
AutoencoderKL with 16 latent channels, FlowMatchEulerDiscreteScheduler), so the engine runs the same
code path for the demo and for a real model directory. The weights are random and seeded: images
are deterministic noise-like pictures, not art. Nothing is downloaded.
"""

from __future__ import annotations

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers

TINY_SEED = 20251126
# Qwen3's chat markers, so the pipeline's apply_chat_template sees what the real tokenizer has.
_SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"]
_CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# Sizes: the text encoder's hidden size must equal the transformer's cap_feat_dim, and the
# transformer's head dim (dim / n_heads) must equal sum(axes_dims). axes_lens[1:] bound the latent
# grid: 2048 px / 8 (VAE) / 2 (patch) = 128 positions, so 256 leaves room for every allowed size.
TEXT_HIDDEN = 32
TRANSFORMER_DIM = 64
TRANSFORMER_HEADS = 2
AXES_DIMS = (8, 12, 12)
AXES_LENS = (1024, 256, 256)


def build_tokenizer():
    """A byte-level BPE tokenizer with no merges: every UTF-8 byte is a token, so any text encodes."""
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {ch: i for i, ch in enumerate(alphabet)}
    for token in _SPECIAL_TOKENS:
        vocab[token] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(_SPECIAL_TOKENS)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<|endoftext|>", eos_token="<|im_end|>")
    fast.chat_template = _CHAT_TEMPLATE
    return fast


def build_tiny_pipeline(dtype: torch.dtype = torch.float32, seed: int = TINY_SEED):
    """Build the demo ZImagePipeline on the CPU; same seed → same weights → same images."""
    from diffusers import (
        AutoencoderKL,
        FlowMatchEulerDiscreteScheduler,
        ZImagePipeline,
        ZImageTransformer2DModel,
    )
    from transformers import Qwen3Config, Qwen3Model

    tokenizer = build_tokenizer()
    # fork_rng keeps the process-wide RNG untouched: building the demo must not change anyone's seed.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        text_encoder = Qwen3Model(
            Qwen3Config(
                vocab_size=len(tokenizer),
                hidden_size=TEXT_HIDDEN,
                intermediate_size=64,
                num_hidden_layers=2,
                num_attention_heads=2,
                num_key_value_heads=1,
                head_dim=16,
                max_position_embeddings=1024,
                rope_theta=1e6,
            )
        )
        transformer = ZImageTransformer2DModel(
            in_channels=16,
            dim=TRANSFORMER_DIM,
            n_layers=2,
            n_refiner_layers=2,  # as the real model (context parallelism splits the first, gathers the last)
            n_heads=TRANSFORMER_HEADS,
            n_kv_heads=TRANSFORMER_HEADS,
            cap_feat_dim=TEXT_HIDDEN,
            axes_dims=list(AXES_DIMS),
            axes_lens=list(AXES_LENS),
        )
        vae = AutoencoderKL(
            in_channels=3,
            out_channels=3,
            latent_channels=16,
            down_block_types=["DownEncoderBlock2D"] * 4,
            up_block_types=["UpDecoderBlock2D"] * 4,
            block_out_channels=[8, 8, 16, 16],
            layers_per_block=1,
            norm_num_groups=4,
            scaling_factor=0.3611,
            shift_factor=0.1159,
            use_quant_conv=False,
            use_post_quant_conv=False,
        )
    for module in (text_encoder, transformer, vae):
        module.eval().requires_grad_(False)
        module.to(dtype)
    pipe = ZImagePipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        transformer=transformer,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe
