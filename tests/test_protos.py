"""The committed gRPC stubs are exactly what protoc makes from protos/*.proto."""

from __future__ import annotations

from pathlib import Path

from protos.generate import REPO_ROOT, generate


def test_committed_stubs_match_the_proto(tmp_path: Path) -> None:
    generated = generate(tmp_path)
    assert {p.name for p in generated} == {
        "inference_pb2.py",
        "inference_pb2.pyi",
        "inference_pb2_grpc.py",
    }
    for path in generated:
        committed = REPO_ROOT / "protos" / path.name
        assert committed.read_text() == path.read_text(), f"{path.name} is stale: run make proto"


def test_the_contract_names() -> None:
    from protos import inference_pb2

    service = inference_pb2.DESCRIPTOR.services_by_name["Classifier"]
    assert service.full_name == "vidflow.inference.v1.Classifier"
    assert {m.name for m in service.methods} == {"Classify", "ClassifyStream", "GetModelInfo"}
    request = inference_pb2.ClassifyRequest.DESCRIPTOR.fields_by_name
    assert (request["image"].number, request["top_k"].number, request["request_id"].number) == (
        1,
        2,
        3,
    )


def test_the_protobuf_floor_is_what_the_stubs_ask_for() -> None:
    """The stubs refuse a protobuf runtime older than the protoc that made them: the project's
    floor (6.31) let pip keep one they fail to import with."""
    import re
    import tomllib

    stub = (REPO_ROOT / "protos" / "inference_pb2.py").read_text()
    made_by = re.search(r"Domain\.PUBLIC,\s*(\d+),\s*(\d+),\s*(\d+),", stub)
    assert made_by is not None
    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]
    (floor,) = [d for d in project["dependencies"] if d.startswith("protobuf>=")]
    assert floor.split(">=")[1].split(",")[0] == ".".join(made_by.groups()), floor
