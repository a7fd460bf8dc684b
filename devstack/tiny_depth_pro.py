"""Depth Pro of the real architecture with random weights: at toy size, or at full size.

No depth weights can be downloaded on machines without internet, so tests, benchmarks and the
offline demo save such a model with `save_pretrained` and load it back through the same
transformers path as `apple/DepthPro-hf`. Its depth values mean nothing, and its config marks
it untrained. The full-size one serves speed measurements (`bench.depth_gpu`).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from tasks.depth.depth_model import UNTRAINED_CONFIG_KEY

# Input 128 px split into 32 px patches at three scales; ViT encoders of 2 layers, width 16.
_ENCODER = {
    "model_type": "dinov2",
    "hidden_size": 16,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "image_size": 32,
    "patch_size": 8,
    "mlp_ratio": 2,
    "out_indices": [2],
    "out_features": ["stage2"],
}
INPUT_SIZE = 128


# apple/DepthPro-hf: three DINOv2-L/16 encoders (image, patches, field of view) at 384 px.
FULL_SIZE_ENCODER = {
    "model_type": "dinov2",
    "hidden_size": 1024,
    "num_hidden_layers": 24,
    "num_attention_heads": 16,
    "patch_size": 16,
    "image_size": 384,
}


def save_random_depth_pro(
    directory: Path,
    encoder: dict[str, object],
    *,
    input_size: int | None = None,
    seed: int = 0,
    **config_fields: object,
) -> Path:
    """Write a Depth Pro with random weights, marked untrained (weights, config, image processor).

    `encoder` configures all three encoders; `input_size` the image processor (its default, the
    real 1536 px, when None); `config_fields` go to `DepthProConfig`.
    """
    import torch
    from transformers import DepthProConfig, DepthProForDepthEstimation, DepthProImageProcessor
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()

    config = DepthProConfig(
        image_model_config=dict(encoder),
        patch_model_config=dict(encoder),
        fov_model_config=dict(encoder),
        **config_fields,
    )
    setattr(config, UNTRAINED_CONFIG_KEY, True)  # saved in config.json; outputs say untrained
    torch.manual_seed(seed)
    model = DepthProForDepthEstimation(config).eval()
    directory = Path(directory)
    model.save_pretrained(directory)
    sizes = {"size": {"height": input_size, "width": input_size}} if input_size else {}
    DepthProImageProcessor(**sizes).save_pretrained(directory)
    for saved in directory.iterdir():  # safetensors writes 0600: a container's user could not
        saved.chmod(saved.stat().st_mode | 0o044)  # load a folder mounted from here
    return directory


def save_tiny_depth_pro(directory: Path, seed: int = 0, *, fov: bool = True) -> Path:
    """A tiny random Depth Pro: fast enough for tests on a CPU (`fov`: with the field-of-view
    head that makes depth metric, as apple/DepthPro-hf has)."""
    return save_random_depth_pro(
        directory,
        _ENCODER,
        input_size=INPUT_SIZE,
        seed=seed,
        patch_size=32,
        fusion_hidden_size=16,
        intermediate_hook_ids=[1, 0],
        intermediate_feature_dims=[8, 8],
        scaled_images_feature_dims=[16, 16, 8],
        use_fov_model=fov,
        num_fov_head_layers=1,
    )


def save_full_size_depth_pro(directory: Path, seed: int = 0) -> Path:
    """Depth Pro at the size of apple/DepthPro-hf (1536 px input), random weights: for speed."""
    return save_random_depth_pro(directory, FULL_SIZE_ENCODER, seed=seed)


def main(argv: list[str]) -> int:
    """`python -m devstack.tiny_depth_pro DIR`: save the tiny stand-in to DIR, to try the
    depth pipeline where no weights can be had (`vidflow depth --depth-model DIR`)."""
    parser = argparse.ArgumentParser(
        prog="python -m devstack.tiny_depth_pro",
        description="Save an UNTRAINED Depth Pro (random weights, toy size) to DIR, to try the "
        "depth pipeline where no weights can be had: vidflow depth --depth-model DIR.",
    )
    parser.add_argument("directory", type=Path, metavar="DIR", help="a new or empty folder")
    directory = parser.parse_args(argv).directory
    if directory.exists() and (not directory.is_dir() or any(directory.iterdir())):
        # Its files would be overwritten or mixed with the stand-in's.
        parser.error(f"{directory} is not a new or empty folder")
    saved = save_tiny_depth_pro(directory)
    print(f"saved an UNTRAINED Depth Pro (random weights) to {saved}: --depth-model {saved}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
