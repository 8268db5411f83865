"""Results taken away and brought back, through `lpnet.client` against a real server on loopback: the
pruned model of a weights-mode plan (safetensors or ONNX), a predictor's artifact, and that artifact
imported as another device's predictor."""

from __future__ import annotations

import json
from collections.abc import Iterator

import httpx
import numpy as np
import onnxruntime
import pytest
import torch
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors

from lpnet.arch.groups import channel_layout
from lpnet.client import Client, Conflict, Forbidden, InvalidRequest, NotFound
from lpnet.predictor.artifact import read_header
from lpnet.pruning import load_pruned, prune_module
from service.config import WorkerSettings
from service.job_handlers import default_registry
from service.jobs.worker import Worker
from service.testing.tiny import TINY_INPUT_SHAPE, TinyProfile, tiny_module
from tests.service.test_api_plans import budget_at
from tests.service.test_client import LiveServer, Served, served


@pytest.fixture
def queued_server(migrated_url: str, tiny_profile: TinyProfile, live_server: LiveServer) -> Iterator[Served]:
    """`served` on each backend, with no embedded worker: plans stay queued until a test runs them."""
    with served(migrated_url, tiny_profile, live_server, worker=WorkerSettings(embedded=False)) as running:
        yield running


def _run_queued_jobs(server: Served) -> None:
    worker = Worker(server.factory, default_registry())
    while worker.run_once() is not None:
        pass


def _onnx_output(data: bytes, x: torch.Tensor) -> np.ndarray:
    onnx_session = onnxruntime.InferenceSession(data, providers=["CPUExecutionProvider"])
    [output] = onnx_session.run(None, {onnx_session.get_inputs()[0].name: x.numpy()})
    return np.asarray(output)


def test_a_weights_plan_gives_its_pruned_model_as_safetensors_or_onnx(
    queued_server: Served, tiny_profile: TinyProfile
) -> None:
    module = tiny_module().eval()
    network = tiny_profile.network
    with queued_server.client("admin") as client:
        upload = client.upload_model("tiny", module.state_dict(), architecture=network)
        accepted = client.create_plan(
            "tiny-cpu", network, budget_at(tiny_profile, 0.5), mode="weights", model_id=upload.id
        )
        with pytest.raises(Conflict) as queued:
            client.plan_model(accepted.job_id)
        assert queued.value.code == "plan_has_no_model" and "is queued" in queued.value.message

        _run_queued_jobs(queued_server)
        result = client.plan(accepted.job_id).result
        assert result is not None
        pruned = load_pruned(client.plan_model(accepted.job_id))
        onnx_data = client.plan_model(accepted.job_id, format="onnx")

    assert pruned.widths == result["widths"] and pruned.widths != list(channel_layout(network).full_widths)
    assert pruned.kept_indices == [group["kept_indices"] for group in result["groups"]]
    expected = prune_module(module, network, result["widths"], pruned.kept_indices).module
    x = torch.randn(TINY_INPUT_SHAPE)
    with torch.no_grad():
        reference = expected(x)
        torch.testing.assert_close(pruned.module(x), reference)
    np.testing.assert_allclose(_onnx_output(onnx_data, x), reference.numpy(), rtol=1e-4, atol=1e-5)

    # An Accept header asks for ONNX too; ?format= wins over it.
    path = f"{queued_server.url}/v1/plans/{accepted.job_id}/model"
    auth = {"Authorization": f"Bearer {queued_server.keys['reader']}"}
    by_accept = httpx.get(path, headers={**auth, "Accept": "application/onnx"})
    assert by_accept.status_code == 200 and by_accept.headers["content-type"] == "application/onnx"
    assert f"plan-{accepted.job_id}-pruned.onnx" in by_accept.headers["content-disposition"]
    np.testing.assert_allclose(_onnx_output(by_accept.content, x), reference.numpy(), rtol=1e-4, atol=1e-5)
    overridden = httpx.get(
        path, params={"format": "safetensors"}, headers={**auth, "Accept": "application/onnx"}
    )
    assert overridden.headers["content-type"] == "application/octet-stream"
    assert load_pruned(overridden.content).widths == pruned.widths


def test_plans_without_a_pruned_model_are_refused_by_name(
    queued_server: Served, tiny_profile: TinyProfile
) -> None:
    with queued_server.client() as client:
        accepted = client.create_plan("tiny-cpu", tiny_profile.network, budget_at(tiny_profile, 0.5))
        _run_queued_jobs(queued_server)
        assert client.plan(accepted.job_id).status == "succeeded"
        with pytest.raises(Conflict) as architecture_only:
            client.plan_model(accepted.job_id)
        assert architecture_only.value.status == 409 and architecture_only.value.code == "plan_has_no_model"
        assert "'architecture'" in architecture_only.value.message
        assert architecture_only.value.details == {"plan_id": accepted.job_id, "mode": "architecture"}
        with pytest.raises(NotFound) as missing:
            client.plan_model(999_999)
        assert "999999" in missing.value.message
        response = httpx.get(
            f"{queued_server.url}/v1/plans/{accepted.job_id}/model",
            params={"format": "pickle"},
            headers={"Authorization": f"Bearer {queued_server.keys['reader']}"},
        )
        assert response.status_code == 422 and response.json()["error"]["code"] == "validation_error"
        assert "format" in response.text


def test_a_predictor_exported_from_one_device_predicts_the_same_on_another(
    queued_server: Served, tiny_profile: TinyProfile
) -> None:
    with queued_server.client("admin") as admin:
        artifact = admin.predictor_artifact(queued_server.predictor_id)
        assert artifact == tiny_profile.fitted.artifact
        edge = admin.register_device("edge-1", "cpu")
    with Client(queued_server.url, edge.agent_key) as agent:
        first = agent.import_predictor("edge-1", artifact)
        with pytest.raises(Forbidden):
            agent.import_predictor("tiny-cpu", artifact)
    with queued_server.client("admin") as admin:
        second = admin.import_predictor(edge.id, artifact)
        original = admin.predictor(queued_server.predictor_id)
        assert (first.device, first.version, second.version) == ("edge-1", 1, 2)
        assert first.metrics == original.metrics
        assert first.training_fingerprint == original.training_fingerprint
        assert [p.id for p in admin.predictors("edge-1")] == [second.id, first.id]
        on_edge = admin.latency("edge-1", tiny_profile.network)
        on_tiny = admin.latency("tiny-cpu", tiny_profile.network)
        assert on_edge.predictor.id == second.id
        assert on_edge.total_ms == pytest.approx(on_tiny.total_ms, rel=1e-6)
    with queued_server.client() as reader:
        assert reader.predictor_artifact(second.id) == artifact
        with pytest.raises(Forbidden):
            reader.import_predictor("edge-1", artifact)


def _with_header(artifact: bytes, **changes: str) -> bytes:
    return save_tensors(load_tensors(artifact), metadata={**read_header(artifact), **changes})


def test_unusable_predictor_artifacts_are_refused_with_what_is_wrong(
    queued_server: Served, tiny_profile: TinyProfile
) -> None:
    artifact = tiny_profile.fitted.artifact
    with queued_server.client("admin") as admin:
        with pytest.raises(InvalidRequest) as future:
            admin.import_predictor("tiny-cpu", _with_header(artifact, artifact_version="99"))
        assert future.value.status == 422 and future.value.code == "predictor_artifact_unreadable"
        assert "version 99" in future.value.message and future.value.details["artifact_version"] == 99
        with pytest.raises(InvalidRequest) as schema:
            admin.import_predictor("tiny-cpu", _with_header(artifact, feature_schema_version="0"))
        assert "feature schema 0" in schema.value.message
        with pytest.raises(InvalidRequest) as foreign:
            admin.import_predictor("tiny-cpu", _with_header(artifact, format="other"))
        assert "not an lpnet predictor artifact" in foreign.value.message
        with pytest.raises(InvalidRequest) as garbage:
            admin.import_predictor("tiny-cpu", b"not a predictor at all")
        assert garbage.value.code == "predictor_artifact_unreadable"
        with pytest.raises(InvalidRequest) as broken_config:
            admin.import_predictor("tiny-cpu", _with_header(artifact, config=json.dumps({"nope": 1})))
        assert broken_config.value.code == "predictor_artifact_unreadable"
        with pytest.raises(NotFound, match="no-such-device"):
            admin.import_predictor("no-such-device", artifact)
        with pytest.raises(NotFound, match="no predictor with id 999999"):
            admin.predictor_artifact(999_999)
        # Nothing refused was stored.
        assert [p.id for p in admin.predictors("tiny-cpu")] == [queued_server.predictor_id]
    empty = httpx.post(
        f"{queued_server.url}/v1/devices/tiny-cpu/predictors/import",
        headers={
            "Authorization": f"Bearer {queued_server.keys['admin']}",
            "Content-Type": "application/octet-stream",
        },
    )
    assert empty.status_code == 422 and empty.json()["error"]["details"]["errors"][0]["field"] == "body"
