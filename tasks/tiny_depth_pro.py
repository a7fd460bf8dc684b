"""A Depth Pro of the real architecture at toy size, with random weights.

No depth weights can be downloaded on machines without internet, so tests, benchmarks and the
offline demo save this model with `save_pretrained` and load it back through the same
transformers path as `apple/DepthPro-hf`. Its depth values mean nothing.
"""

from __future__ import annotations

from pathlib import Path

from tasks.depth import UNTRAINED_CONFIG_KEY

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


def save_tiny_depth_pro(directory: Path, seed: int = 0) -> Path:
    """Write a tiny random Depth Pro (weights, config, image processor) into `directory`."""
    import torch
    from transformers import DepthProConfig, DepthProForDepthEstimation, DepthProImageProcessor
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()

    config = DepthProConfig(
        patch_size=32,
        fusion_hidden_size=16,
        intermediate_hook_ids=[1, 0],
        intermediate_feature_dims=[8, 8],
        scaled_images_feature_dims=[16, 16, 8],
        image_model_config=dict(_ENCODER),
        patch_model_config=dict(_ENCODER),
        fov_model_config=dict(_ENCODER),
        use_fov_model=True,
        num_fov_head_layers=1,
    )
    setattr(config, UNTRAINED_CONFIG_KEY, True)  # saved in config.json; outputs say untrained
    torch.manual_seed(seed)
    model = DepthProForDepthEstimation(config).eval()
    directory = Path(directory)
    model.save_pretrained(directory)
    DepthProImageProcessor(size={"height": INPUT_SIZE, "width": INPUT_SIZE}).save_pretrained(
        directory
    )
    return directory
