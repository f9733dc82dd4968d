"""Tiny, randomly initialised instances of the real backbone architectures, saved with
``save_pretrained`` in the layout of the real hub repositories, so tests load them through the
same ``model_id`` path users take. Plain functions: ``make_tiny_<name>(directory) -> str``.

:func:`tiny_model_dir` builds each once per process into a temporary folder (removed at exit),
so several test modules share the builds.

Sizes: the ViTs take 32 px images with 8 px patches (a 4×4 grid, 2 layers, 2 heads); the
Stable Diffusion stand-in takes 64 px images, its VAE downsamples by 8 like the real one, and
its UNet has attention at latent grids 8, 4 and 2.

``size="base"`` builds the published architectures instead (ViT-B: 12 layers, 12 heads, width
768; SD v1: the 860M-parameter UNet and the KL-f8 VAE), still randomly initialised — for
measuring real-size layer grids and speed without the weights (experiments/backbone_report.py).
The text towers and tokenizers stay tiny in both sizes: ldsc only embeds the empty prompt.
"""

from __future__ import annotations

import atexit
import functools
import json
import os
import shutil
import tempfile

import torch

TINY_VIT = dict(
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=2,
    intermediate_size=37,
    image_size=32,
    patch_size=8,
)
TINY_VIT_INPUT = 32
TINY_SD_INPUT = 64
#: ViT-B (CLIP ViT-B/16, DINO ViT-B/8, MAE ViT-B/16 differ only in the patch size)
BASE_VIT = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
                image_size=224, patch_size=16)
BASE_PATCH = {"clip": 16, "dino": 8, "mae": 16}


def _vit_spec(name: str, size: str) -> dict:
    if size == "tiny":
        return dict(TINY_VIT)
    if size == "base":
        return dict(BASE_VIT, patch_size=BASE_PATCH[name])
    raise ValueError(f"size must be 'tiny' or 'base', got {size!r}")


def _save_preprocessor(directory: str, mean, std, size: int) -> None:
    with open(os.path.join(directory, "preprocessor_config.json"), "w") as f:
        json.dump({"image_mean": list(mean), "image_std": list(std), "size": size}, f)


def make_tiny_clip(directory: str, size: str = "tiny") -> str:
    """A whole ``CLIPModel`` checkpoint (text and vision towers), like ``openai/clip-vit-*``."""
    from transformers import CLIPConfig, CLIPModel, CLIPTextConfig, CLIPVisionConfig

    torch.manual_seed(0)
    vision = CLIPVisionConfig(**_vit_spec("clip", size))
    text = CLIPTextConfig(hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=2,
                          vocab_size=64, max_position_embeddings=16, bos_token_id=0, eos_token_id=1, pad_token_id=1)
    CLIPModel(CLIPConfig(text_config=text.to_dict(), vision_config=vision.to_dict(), projection_dim=16)
              ).save_pretrained(directory)
    _save_preprocessor(directory, (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711),
                       vision.image_size)
    return directory


def make_tiny_dino(directory: str, size: str = "tiny") -> str:
    """A ``ViTModel`` checkpoint like ``facebook/dino-vitb8`` (no preprocessor file: defaults)."""
    from transformers import ViTConfig, ViTModel

    torch.manual_seed(0)
    ViTModel(ViTConfig(**_vit_spec("dino", size))).save_pretrained(directory)
    return directory


def make_tiny_mae(directory: str, size: str = "tiny") -> str:
    """A ``ViTMAEForPreTraining`` checkpoint (encoder + decoder) like ``facebook/vit-mae-base``,
    saved with the pretraining ``mask_ratio = 0.75``."""
    from transformers import ViTMAEConfig, ViTMAEForPreTraining

    torch.manual_seed(0)
    decoder = (dict(decoder_hidden_size=16, decoder_num_hidden_layers=1, decoder_num_attention_heads=2,
                    decoder_intermediate_size=20) if size == "tiny" else
               dict(decoder_hidden_size=512, decoder_num_hidden_layers=8, decoder_num_attention_heads=16,
                    decoder_intermediate_size=2048))
    config = ViTMAEConfig(**_vit_spec("mae", size), **decoder, mask_ratio=0.75)
    model = ViTMAEForPreTraining(config)
    # random sin-cos position embeddings differ per position, so a shuffle would be visible
    model.save_pretrained(directory)
    _save_preprocessor(directory, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), config.image_size)
    return directory


def make_tiny_dinov2(directory: str, size: str = "tiny", registers: int = 0) -> str:
    """A ``Dinov2Model`` (``facebook/dinov2-base``) or, with ``registers``, a
    ``Dinov2WithRegistersModel`` (``facebook/dinov2-with-registers-base``) checkpoint."""
    from transformers import Dinov2Config, Dinov2Model, Dinov2WithRegistersConfig, Dinov2WithRegistersModel

    torch.manual_seed(0)
    spec = dict(TINY_VIT) if size == "tiny" else dict(BASE_VIT, patch_size=14, image_size=518)
    spec.pop("intermediate_size")  # DINOv2 sizes its MLP by mlp_ratio
    if registers:
        Dinov2WithRegistersModel(Dinov2WithRegistersConfig(**spec, num_register_tokens=registers)).save_pretrained(directory)
    else:
        Dinov2Model(Dinov2Config(**spec)).save_pretrained(directory)
    _save_preprocessor(directory, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), spec["image_size"])
    return directory


def make_tiny_dinov3(directory: str, size: str = "tiny") -> str:
    """A ``DINOv3ViTModel`` checkpoint (rotary position embeddings, 4 registers), like
    ``facebook/dinov3-vitb16-pretrain-lvd1689m``."""
    from transformers import DINOv3ViTConfig, DINOv3ViTModel

    torch.manual_seed(0)
    spec = dict(TINY_VIT) if size == "tiny" else dict(BASE_VIT)
    DINOv3ViTModel(DINOv3ViTConfig(**spec, num_register_tokens=4)).save_pretrained(directory)
    return directory


def make_tiny_siglip(directory: str, size: str = "tiny") -> str:
    """A whole ``SiglipModel`` checkpoint (text and vision towers; no class token), like
    ``google/siglip-base-patch16-224``."""
    from transformers import SiglipConfig, SiglipModel

    torch.manual_seed(0)
    vision = dict(TINY_VIT) if size == "tiny" else dict(BASE_VIT)
    text = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=2, vocab_size=64,
                max_position_embeddings=16, bos_token_id=0, eos_token_id=1, pad_token_id=1)
    SiglipModel(SiglipConfig(text_config=text, vision_config=vision)).save_pretrained(directory)
    _save_preprocessor(directory, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), vision["image_size"])
    return directory


def make_tiny_timm(directory: str, size: str = "tiny", arch: str = "vit_base_patch14_reg4_dinov2") -> str:
    """A timm model (``arch``, e.g. DINOv2 with 4 registers or EVA-02 with rotary embeddings) saved
    with ``timm.models.save_for_hf``; load it as ``local-dir:<directory>``."""
    import timm
    from timm.models import save_for_hf

    torch.manual_seed(0)
    spec = dict(depth=2, embed_dim=32, num_heads=2, img_size=32, patch_size=8) if size == "tiny" else {}
    model = timm.create_model(arch, pretrained=False, **spec)
    save_for_hf(model, directory, model_args=spec)
    return directory


def _tiny_clip_tokenizer(directory: str, max_length: int) -> None:
    """vocab.json + merges.txt + tokenizer_config.json of a byte-level BPE CLIP tokenizer."""
    os.makedirs(directory, exist_ok=True)
    letters = "abcdefghijklmnopqrstuvwxyz"
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in letters:
        vocab[c] = len(vocab)
    for c in letters:
        vocab[c + "</w>"] = len(vocab)
    with open(os.path.join(directory, "vocab.json"), "w") as f:
        json.dump(vocab, f)
    with open(os.path.join(directory, "merges.txt"), "w") as f:
        f.write("#version: 0.2\n")
    with open(os.path.join(directory, "tokenizer_config.json"), "w") as f:
        json.dump({"tokenizer_class": "CLIPTokenizer", "model_max_length": max_length,
                   "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>",
                   "unk_token": "<|endoftext|>", "pad_token": "<|endoftext|>"}, f)


def make_tiny_sd(directory: str, size: str = "tiny") -> str:
    """A Stable-Diffusion-v1 layout (vae/, unet/, text_encoder/, tokenizer/, scheduler/)."""
    from diffusers import AutoencoderKL, PNDMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    if size not in ("tiny", "base"):
        raise ValueError(f"size must be 'tiny' or 'base', got {size!r}")
    tiny = size == "tiny"
    torch.manual_seed(0)
    AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 8, 16, 16) if tiny else (128, 256, 512, 512),
        layers_per_block=1 if tiny else 2,
        latent_channels=4,
        norm_num_groups=8 if tiny else 32,
        sample_size=TINY_SD_INPUT if tiny else 512,
    ).save_pretrained(os.path.join(directory, "vae"))
    max_length = 16 if tiny else 77
    text_width = 32 if tiny else 768
    unet = dict(
        sample_size=TINY_SD_INPUT // 8,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(16, 32, 32),
        layers_per_block=1,
        norm_num_groups=8,
        attention_head_dim=2,  # SD v1 naming: this is the number of heads
    ) if tiny else dict(
        sample_size=64,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        block_out_channels=(320, 640, 1280, 1280),
        layers_per_block=2,
        norm_num_groups=32,
        attention_head_dim=8,
    )
    UNet2DConditionModel(in_channels=4, out_channels=4, cross_attention_dim=text_width, **unet
                         ).save_pretrained(os.path.join(directory, "unet"))
    CLIPTextModel(
        CLIPTextConfig(hidden_size=text_width, intermediate_size=37, num_hidden_layers=1, num_attention_heads=2,
                       vocab_size=64, max_position_embeddings=max_length, bos_token_id=0, eos_token_id=1,
                       pad_token_id=1)
    ).save_pretrained(os.path.join(directory, "text_encoder"))
    _tiny_clip_tokenizer(os.path.join(directory, "tokenizer"), max_length)
    # the real repository ships a PNDM config; its betas are all the DDPM noising needs
    PNDMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, num_train_timesteps=1000,
                  skip_prk_steps=True, set_alpha_to_one=False, steps_offset=1,
                  ).save_pretrained(os.path.join(directory, "scheduler"))
    return directory


def make_tiny_sd2(directory: str, size: str = "tiny") -> str:
    """A Stable-Diffusion-2.x layout: linear projections in the transformer blocks, heads per
    block, upcast attention, an OpenCLIP-width text encoder and a v-prediction DDIM scheduler
    (``stabilityai/stable-diffusion-2-1``)."""
    from diffusers import DDIMScheduler, UNet2DConditionModel

    make_tiny_sd(directory, size)
    tiny = size == "tiny"
    torch.manual_seed(0)
    UNet2DConditionModel(
        in_channels=4, out_channels=4, sample_size=TINY_SD_INPUT // 8 if tiny else 96,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D") if tiny else
        ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D") if tiny else
        ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        block_out_channels=(16, 32, 32) if tiny else (320, 640, 1280, 1280),
        layers_per_block=1 if tiny else 2, norm_num_groups=8 if tiny else 32,
        attention_head_dim=(2, 4, 4) if tiny else (5, 10, 20, 20),  # heads per block (diffusers' naming)
        use_linear_projection=True, upcast_attention=True, cross_attention_dim=32 if tiny else 1024,
    ).save_pretrained(os.path.join(directory, "unet"))
    if not tiny:  # the text encoder of the real size is 1024 wide
        from transformers import CLIPTextConfig, CLIPTextModel

        CLIPTextModel(CLIPTextConfig(hidden_size=1024, intermediate_size=37, num_hidden_layers=1, num_attention_heads=2,
                                     vocab_size=64, max_position_embeddings=77, bos_token_id=0, eos_token_id=1,
                                     pad_token_id=1)).save_pretrained(os.path.join(directory, "text_encoder"))
    shutil.rmtree(os.path.join(directory, "scheduler"))
    DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, num_train_timesteps=1000,
                  prediction_type="v_prediction", clip_sample=False, set_alpha_to_one=False, steps_offset=1,
                  ).save_pretrained(os.path.join(directory, "scheduler"))
    return directory


def make_tiny_sdxl(directory: str, size: str = "tiny") -> str:
    """A Stable-Diffusion-XL layout (``stabilityai/stable-diffusion-xl-base-1.0``): two text encoders
    (the second with a projection), a UNet with text/time added conditioning and several
    transformer layers per block, no attention at the highest resolution, a VAE that asks for
    float32 (``force_upcast``)."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    tiny = size == "tiny"
    torch.manual_seed(0)
    AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 8, 16, 16) if tiny else (128, 256, 512, 512), layers_per_block=1 if tiny else 2,
        latent_channels=4, norm_num_groups=8 if tiny else 32, sample_size=TINY_SD_INPUT if tiny else 1024,
        scaling_factor=0.13025, force_upcast=True,
    ).save_pretrained(os.path.join(directory, "vae"))
    max_length = 16 if tiny else 77
    widths = (32, 32) if tiny else (768, 1280)
    pooled = 16 if tiny else 1280
    time_dim = 8 if tiny else 256
    UNet2DConditionModel(
        in_channels=4, out_channels=4, sample_size=TINY_SD_INPUT // 8 if tiny else 128,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(16, 32, 32) if tiny else (320, 640, 1280), layers_per_block=1 if tiny else 2,
        norm_num_groups=8 if tiny else 32, attention_head_dim=(2, 4, 4) if tiny else (5, 10, 20),
        transformer_layers_per_block=(1, 1, 2) if tiny else (1, 2, 10), use_linear_projection=True,
        cross_attention_dim=sum(widths), addition_embed_type="text_time", addition_time_embed_dim=time_dim,
        projection_class_embeddings_input_dim=pooled + 6 * time_dim,
    ).save_pretrained(os.path.join(directory, "unet"))
    text = dict(intermediate_size=37, num_hidden_layers=2, num_attention_heads=2, vocab_size=64,
                max_position_embeddings=max_length, bos_token_id=0, eos_token_id=1, pad_token_id=1)
    CLIPTextModel(CLIPTextConfig(hidden_size=widths[0], **text)).save_pretrained(os.path.join(directory, "text_encoder"))
    CLIPTextModelWithProjection(CLIPTextConfig(hidden_size=widths[1], projection_dim=pooled, **text)
                                ).save_pretrained(os.path.join(directory, "text_encoder_2"))
    for part in ("tokenizer", "tokenizer_2"):
        _tiny_clip_tokenizer(os.path.join(directory, part), max_length)
    EulerDiscreteScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                           num_train_timesteps=1000, steps_offset=1).save_pretrained(os.path.join(directory, "scheduler"))
    return directory


def _save_t5(directory: str, encoder: str, tokenizer: str, width: int, max_length: int) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import T5Config, T5EncoderModel, T5TokenizerFast

    letters = "abcdefghijklmnopqrstuvwxyz"
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), *(("\u2581" + c, -2.0) for c in letters),
             *((c, -3.0) for c in letters)]
    backend = Tokenizer(models.Unigram(vocab, unk_id=2))
    backend.pre_tokenizer, backend.decoder = pre_tokenizers.Metaspace(), decoders.Metaspace()
    T5TokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="</s>", unk_token="<unk>", extra_ids=0,
                    model_max_length=max_length).save_pretrained(os.path.join(directory, tokenizer))
    T5EncoderModel(T5Config(vocab_size=len(vocab), d_model=width, d_kv=8, d_ff=37, num_layers=1, num_heads=2,
                            pad_token_id=0, eos_token_id=1)).save_pretrained(os.path.join(directory, encoder))


def _save_clip_text(directory: str, encoder: str, tokenizer: str, width: int, max_length: int,
                    projection: int | None = None) -> None:
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(hidden_size=width, intermediate_size=37, num_hidden_layers=2, num_attention_heads=2,
                            vocab_size=64, max_position_embeddings=max_length, bos_token_id=0, eos_token_id=1,
                            pad_token_id=1, **({"projection_dim": projection} if projection else {}))
    (CLIPTextModelWithProjection if projection else CLIPTextModel)(config).save_pretrained(os.path.join(directory, encoder))
    _tiny_clip_tokenizer(os.path.join(directory, tokenizer), max_length)


def _save_vae(directory: str, tiny: bool, channels: int, **config) -> None:
    from diffusers import AutoencoderKL

    AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                  up_block_types=("UpDecoderBlock2D",) * 4,
                  block_out_channels=(8, 8, 16, 16) if tiny else (128, 256, 512, 512), layers_per_block=1 if tiny else 2,
                  latent_channels=channels, norm_num_groups=8 if tiny else 32, **config,
                  ).save_pretrained(os.path.join(directory, "vae"))


def _model_index(directory: str, pipeline: str, parts: dict) -> None:
    """``model_index.json`` of a diffusers pipeline folder: ``{part: [library, class]}``."""
    with open(os.path.join(directory, "model_index.json"), "w") as f:
        json.dump({"_class_name": pipeline, "_diffusers_version": "0.42.1", **parts}, f)


def make_tiny_sd3(directory: str, size: str = "tiny") -> str:
    """A Stable-Diffusion-3.5 layout (``stabilityai/stable-diffusion-3.5-medium``): MMDiT with joint
    attention (image tokens, then text tokens), dual attention in its first blocks and RMS
    QK-norm, a 16-channel VAE with shift, two CLIP text encoders with projections and a T5."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel

    tiny = size == "tiny"
    torch.manual_seed(0)
    _save_vae(directory, tiny, 16, scaling_factor=1.5305, shift_factor=0.0609)
    heads, head_dim = (2, 8) if tiny else (24, 64)
    SD3Transformer2DModel(
        sample_size=TINY_SD_INPUT // 8 if tiny else 128, patch_size=2, in_channels=16, out_channels=16,
        num_layers=2 if tiny else 24, attention_head_dim=head_dim, num_attention_heads=heads,
        joint_attention_dim=32 if tiny else 4096, caption_projection_dim=heads * head_dim,
        pooled_projection_dim=32 if tiny else 2048, pos_embed_max_size=16 if tiny else 384,
        dual_attention_layers=(0,) if tiny else tuple(range(13)), qk_norm="rms_norm",
    ).save_pretrained(os.path.join(directory, "transformer"))
    max_length = 16 if tiny else 77
    clip_widths = (16, 16) if tiny else (768, 1280)
    _save_clip_text(directory, "text_encoder", "tokenizer", clip_widths[0], max_length, projection=clip_widths[0])
    _save_clip_text(directory, "text_encoder_2", "tokenizer_2", clip_widths[1], max_length, projection=clip_widths[1])
    _save_t5(directory, "text_encoder_3", "tokenizer_3", 32 if tiny else 4096, 16 if tiny else 256)
    FlowMatchEulerDiscreteScheduler(shift=3.0).save_pretrained(os.path.join(directory, "scheduler"))
    _model_index(directory, "StableDiffusion3Pipeline", {
        "transformer": ["diffusers", "SD3Transformer2DModel"], "vae": ["diffusers", "AutoencoderKL"],
        "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
        "text_encoder": ["transformers", "CLIPTextModelWithProjection"], "tokenizer": ["transformers", "CLIPTokenizer"],
        "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"], "tokenizer_2": ["transformers", "CLIPTokenizer"],
        "text_encoder_3": ["transformers", "T5EncoderModel"], "tokenizer_3": ["transformers", "T5TokenizerFast"],
        "image_encoder": [None, None], "feature_extractor": [None, None]})
    return directory


def make_tiny_flux(directory: str, size: str = "tiny") -> str:
    """A FLUX.1 layout (``black-forest-labs/FLUX.1-dev``): double-stream blocks (text tokens, then
    image tokens) and single-stream blocks, rotary embeddings, RMS QK-norm, guidance embedding, 2x2
    latent packing, a 16-channel VAE with shift, CLIP (pooled) and T5 text encoders."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel

    tiny = size == "tiny"
    torch.manual_seed(0)
    _save_vae(directory, tiny, 16, scaling_factor=0.3611, shift_factor=0.1159)
    FluxTransformer2DModel(
        patch_size=1, in_channels=64, num_layers=1 if tiny else 19, num_single_layers=1 if tiny else 38,
        attention_head_dim=16 if tiny else 128, num_attention_heads=2 if tiny else 24,
        joint_attention_dim=32 if tiny else 4096, pooled_projection_dim=16 if tiny else 768, guidance_embeds=True,
        axes_dims_rope=(4, 6, 6) if tiny else (16, 56, 56),
    ).save_pretrained(os.path.join(directory, "transformer"))
    _save_clip_text(directory, "text_encoder", "tokenizer", 16 if tiny else 768, 16 if tiny else 77)
    _save_t5(directory, "text_encoder_2", "tokenizer_2", 32 if tiny else 4096, 16 if tiny else 512)
    FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True).save_pretrained(
        os.path.join(directory, "scheduler"))
    _model_index(directory, "FluxPipeline", {
        "transformer": ["diffusers", "FluxTransformer2DModel"], "vae": ["diffusers", "AutoencoderKL"],
        "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
        "text_encoder_2": ["transformers", "T5EncoderModel"], "tokenizer_2": ["transformers", "T5TokenizerFast"],
        "image_encoder": [None, None], "feature_extractor": [None, None]})
    return directory


def make_tiny_pixart(directory: str, size: str = "tiny") -> str:
    """A PixArt-α layout (``PixArt-alpha/PixArt-XL-2-1024-MS``): DiT blocks with self-attention
    (``attn1``) and cross-attention to T5 states (``attn2``), the SD VAE, a DPM-Solver scheduler."""
    from diffusers import DPMSolverMultistepScheduler, PixArtTransformer2DModel

    tiny = size == "tiny"
    torch.manual_seed(0)
    _save_vae(directory, tiny, 4, scaling_factor=0.18215)
    PixArtTransformer2DModel(
        num_attention_heads=2 if tiny else 16, attention_head_dim=8 if tiny else 72, in_channels=4, out_channels=8,
        num_layers=2 if tiny else 28, norm_num_groups=8 if tiny else 32, cross_attention_dim=16 if tiny else 1152,
        sample_size=TINY_SD_INPUT // 8 if tiny else 128, patch_size=2, caption_channels=32 if tiny else 4096,
    ).save_pretrained(os.path.join(directory, "transformer"))
    _save_t5(directory, "text_encoder", "tokenizer", 32 if tiny else 4096, 16 if tiny else 120)
    DPMSolverMultistepScheduler(beta_schedule="linear", beta_start=0.0001, beta_end=0.02).save_pretrained(
        os.path.join(directory, "scheduler"))
    _model_index(directory, "PixArtAlphaPipeline", {
        "transformer": ["diffusers", "PixArtTransformer2DModel"], "vae": ["diffusers", "AutoencoderKL"],
        "scheduler": ["diffusers", "DPMSolverMultistepScheduler"],
        "text_encoder": ["transformers", "T5EncoderModel"], "tokenizer": ["transformers", "T5TokenizerFast"]})
    return directory


MAKERS = {
    "sd3": make_tiny_sd3, "flux": make_tiny_flux, "pixart": make_tiny_pixart,
    "clip": make_tiny_clip, "dino": make_tiny_dino, "mae": make_tiny_mae, "sd": make_tiny_sd,
    "sd2": make_tiny_sd2, "sdxl": make_tiny_sdxl,
    "dinov2": make_tiny_dinov2, "dinov2_reg": functools.partial(make_tiny_dinov2, registers=4),
    "dinov3": make_tiny_dinov3, "siglip": make_tiny_siglip,
    "timm_dinov2_reg": make_tiny_timm, "timm_eva02": functools.partial(make_tiny_timm, arch="eva02_base_patch14_224"),
}
#: the input size each tiny model is made for
DIFFUSION = {"sd", "sd2", "sdxl", "sd3", "flux", "pixart"}
TINY_INPUT = {name: TINY_SD_INPUT if name in DIFFUSION else TINY_VIT_INPUT for name in MAKERS}


@functools.lru_cache(maxsize=None)
def _root() -> str:
    root = tempfile.mkdtemp(prefix="ldsc-tiny-models-")
    atexit.register(shutil.rmtree, root, ignore_errors=True)
    return root


@functools.lru_cache(maxsize=None)
def tiny_model_dir(name: str) -> str:
    """Directory of the tiny ``name`` model (``sd``, ``clip``, ``dino`` or ``mae``), built on first use."""
    return MAKERS[name](os.path.join(_root(), name))
