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
